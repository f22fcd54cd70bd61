"""The export job: a model file into its packed form or its integer network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingError
from ..infer.export import export_integer
from ..modelio import load_model, save_model
from ..packed import fp32_state_dict_bytes


@dataclass(frozen=True)
class Export:
    """What ``unetquant export`` wrote: the file, its size and the FP32 file's size."""

    path: str
    layout: str
    file_bytes: int
    fp32_file_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp32_file_bytes / self.file_bytes


def export_model(model_path: str, out_path: str, *, integer: bool = False) -> Export:
    """Write a model file's packed form (codes at their bit width, BatchNorm folded), or with
    ``integer`` its integer network for hardware (``docs/integer-format.md``)."""
    if Path(out_path).resolve() == Path(model_path).resolve():
        raise SettingError(
            f"the output {out_path} is the model file itself; write the export to a new file "
            f"(the original keeps what fine-tuning and resuming need)",
            "out",
        )
    bundle = load_model(model_path)
    if integer:
        info = {"label": bundle.quant.label, "source": Path(model_path).name, **bundle.info}
        export_integer(bundle.model, out_path, info)
        layout = "integer"
    else:
        save_model(out_path, bundle, packed=True)
        layout = "packed"
    size = Path(out_path).stat().st_size
    return Export(out_path, layout, size, fp32_state_dict_bytes(bundle.unet))
