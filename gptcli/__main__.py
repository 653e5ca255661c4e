"""`python -m gptcli ...`, which is also what `torchrun -m gptcli finetune ...` runs on every rank."""

from gptcli.cli import main

if __name__ == "__main__":
    main()
