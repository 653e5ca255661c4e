"""Finding, checking and loading models: names, folders, the hub cache, quantized weights."""
