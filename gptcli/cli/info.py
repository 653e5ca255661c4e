"""`gptcli info`: what a model is, from its files when it can."""

from __future__ import annotations

from gptcli.cli._common import (
    MODELS,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    TrustCodeOpt,
    command,
    emit_json,
    examples,
    load,
    note,
)


@command(
    rich_help_panel=MODELS,
    epilog=examples("gptcli info", "gptcli info -m uer/gpt2-chinese-cluecorpussmall --json | jq .parameters"),
)
def info(
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Architecture, size, context, vocabulary, tokenizer, dtype, device and where the files are."""
    from gptcli.loading.models import folder_info, model_info

    # A plain GPT-2 folder is described from its files, without the seconds torch takes to import.
    quick = folder_info(
        model, device=device, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    if quick is not None:
        facts, notice = quick
        if notice:
            note(notice)
    else:
        facts = model_info(load(model, device, dtype, allow_pickle, trust_remote_code))
    if json_:
        emit_json(facts)
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key.replace('_', ' '):<{width}}  {shown}")
