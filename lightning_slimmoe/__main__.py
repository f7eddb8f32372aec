"""``python -m lightning_slimmoe {train,plan,eval,export} ...`` — the same as the installed ``slimmoe`` command."""

from lightning_slimmoe.cli import console

if __name__ == "__main__":
    console()
