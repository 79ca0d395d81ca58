"""convert and convert-lora: checkpoints and PEFT adapters to GGUF (the work is in
``spectrum_local.convert``)."""

from __future__ import annotations

import click

from .. import formats
from ..errors import SpectrumError
from ..ops import OUTTYPES


@click.command()
@click.argument("source")
@click.option("--out", "-o", type=click.Path(),
              help="Output .gguf file or folder. Default: ./NAME-OUTTYPE.gguf")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f16", show_default=True,
              help="Weight type; the quantized types are made by llama.cpp's quantizer.")
@click.option("--format", "format_name", type=click.Choice(["auto", *sorted(formats.FORMATS)]),
              default="auto", show_default=True, help="The spectrum prompt format to embed.")
@click.option("--revision", help="Hub branch, tag or commit (hub sources only).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--keep-intermediate", is_flag=True,
              help="Keep the float GGUF a quantized type is made from.")
def convert(source, out, outtype, format_name, revision, force, keep_intermediate):
    """Convert a spectrum checkpoint to GGUF with the spectrum template embedded.

    SOURCE is a local checkpoint folder or a hub repo id such as
    tsor13/spectrum-gemma-3-12b-v1 (HF_HUB_OFFLINE=1 uses the cache only).

    \b
    Examples:
      spectrum-local convert tsor13/spectrum-gemma-3-12b-v1 --outtype q4_k_m
      spectrum-local convert ./my-checkpoint -o model-f16.gguf
    """
    try:
        from ..convert import convert as run_conversion
    except ImportError as e:
        raise SpectrumError(f"the converter needs its extra: pip install 'spectrum-local[convert]' "
                            f"({e})") from None
    run_conversion(source, out, outtype=outtype, format=format_name, revision=revision,
                   force=force, keep_intermediate=keep_intermediate, progress=True)


@click.command("convert-lora")
@click.argument("adapter_dir", type=click.Path())
@click.option("--base", required=True, type=click.Path(),
              help="The GGUF of the model the adapter was trained on (any quantization).")
@click.option("--out", "-o", type=click.Path(),
              help="Output .gguf file or folder. Default: ./NAME.gguf, NAME being the "
                   "adapter folder's name.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def convert_lora(adapter_dir, base, out, force):
    """Convert a PEFT LoRA adapter to a GGUF adapter that llama.cpp applies to --base.

    ADAPTER_DIR holds adapter_config.json and adapter_model.safetensors, as PEFT's
    save_pretrained writes them.

    \b
    Examples:
      spectrum-local convert-lora ./my-adapter --base spectrum-gemma-3-12b-v1-Q4_K_M.gguf
      spectrum-local convert-lora ./my-adapter --base model-F16.gguf -o my-adapter.gguf
    """
    try:
        from ..convert.lora import convert_lora as run_conversion
    except ImportError as e:
        raise SpectrumError(f"the converter needs its extra: pip install 'spectrum-local[convert]' "
                            f"({e})") from None
    run_conversion(adapter_dir, base, out, force=force, progress=True)


COMMANDS = [convert, convert_lora]
