"""``lit-pref``: the LightningCLI entry point (``lit-pref fit --config configs/dpo.yaml``)."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules.base import AlignmentModule


class LitPrefCLI(LightningCLI):
    """LightningCLI with the tokenizer written once: the data module's follows the model's."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer_name_or_path")


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a configuration or data error is one readable line, not a traceback.

    Set ``LIT_PREF_DEBUG=1`` to see the full traceback instead.
    """
    try:
        LitPrefCLI(
            AlignmentModule,
            PreferenceDataModule,
            subclass_mode_model=True,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        if os.environ.get("LIT_PREF_DEBUG"):
            raise
        print(f"lit-pref: error: {type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
