"""``lit-pref``: the LightningCLI entry point (``lit-pref fit --config configs/dpo.yaml``)."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules.base import AlignmentModule


def _model_tokenizer(model_name_or_path: str | None, tokenizer_name_or_path: str | None) -> str | None:
    """The tokenizer the model uses: its own ``tokenizer_name_or_path``, else the model path."""
    return tokenizer_name_or_path or model_name_or_path


class LitPrefCLI(LightningCLI):
    """LightningCLI with the tokenizer written once: the data module's follows the model's."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            ("model.init_args.model_name_or_path", "model.init_args.tokenizer_name_or_path"),
            "data.tokenizer_name_or_path",
            compute_fn=_model_tokenizer,
        )


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
    except (ValueError, TypeError, OSError) as error:  # OSError: missing files, hub unreachable
        if os.environ.get("LIT_PREF_DEBUG"):
            raise
        message = " ".join(str(error).split())
        print(f"lit-pref: error: {type(error).__name__}: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
