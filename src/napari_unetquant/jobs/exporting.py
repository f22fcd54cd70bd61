"""The export job: a model file into its packed form or its integer network."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import InferConfig
from ..errors import SettingError
from ..infer.engine import has_integer_layers
from ..infer.export import export_integer
from ..infer.onnx_graph import export_onnx
from ..infer.predict import GAUSSIAN_FLOOR
from ..modelio import SegmentationModel, load_model, save_model
from ..packed import fp32_state_dict_bytes


@dataclass(frozen=True)
class Export:
    """What ``unetquant export`` wrote: the file, its size and the FP32 file's size."""

    path: str
    layout: str
    file_bytes: int
    fp32_file_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        return self.fp32_file_bytes / self.file_bytes


EXPORT_FORMATS = ("packed", "integer", "onnx")
ONNX_FORMS = ("auto", "int8", "float")


def export_model(
    model_path: str,
    out_path: str,
    *,
    integer: bool = False,
    format: str = "packed",
    onnx_form: str = "auto",
) -> Export:
    """Write a model file's packed form (codes at their bit width, BatchNorm folded), its
    integer network for hardware (``integer`` or ``format="integer"``,
    ``docs/integer-format.md``), or an ONNX file (``format="onnx"``: the int8 form for models
    with quantized weights and activations unless ``onnx_form`` says ``"float"``)."""
    if format not in EXPORT_FORMATS:
        raise SettingError(
            f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}", "out"
        )
    if onnx_form not in ONNX_FORMS:
        raise SettingError(f"unknown ONNX form {onnx_form!r}; use {', '.join(ONNX_FORMS)}", "out")
    if integer:
        format = "integer"
    if Path(out_path).resolve() == Path(model_path).resolve():
        raise SettingError(
            f"the output {out_path} is the model file itself; write the export to a new file "
            f"(the original keeps what fine-tuning and resuming need)",
            "out",
        )
    bundle = load_model(model_path)
    notes: tuple[str, ...] = ()
    if format == "onnx":
        form = onnx_form
        if form == "auto":
            form = "int8" if has_integer_layers(bundle.model) else "float"
        export_onnx(bundle.model, out_path, form, onnx_file_metadata(bundle, model_path))
        layout = f"ONNX, {form}"
    elif format == "integer":
        info = {"label": bundle.quant.label, "source": Path(model_path).name, **bundle.info}
        description = export_integer(bundle.model, out_path, info, deployment_metadata(bundle))
        layout = "integer"
        notes = _float_layer_notes(description["float_layers"], len(description["layers"]))
    else:
        save_model(out_path, bundle, packed=True)
        layout = "packed"
    size = Path(out_path).stat().st_size
    return Export(out_path, layout, size, fp32_state_dict_bytes(bundle.unet), notes)


def _float_layer_notes(float_layers: list[str], count: int) -> tuple[str, ...]:
    """What the user must know when an integer network keeps float layers."""
    if not float_layers:
        return (f"all {count} layers are integer: the file is reproducible bit for bit",)
    return (
        f"{len(float_layers)} of {count} layers compute in float32 ({', '.join(float_layers)}): "
        f"other programs reproduce them only to float rounding, so a few output codes and "
        f"mask pixels can differ; a model trained with its edge layers quantized has none",
    )


def deployment_metadata(bundle: SegmentationModel) -> dict[str, object]:
    """What a runtime needs beside the network, the same in every export: the input's
    preprocessing, the threshold and the tiling ``unetquant segment`` uses
    (``docs/integer-format.md`` defines each rule exactly)."""
    infer = InferConfig()
    return {
        "preprocess": asdict(bundle.preprocess),
        "preprocess_text": bundle.preprocess.text,
        "threshold": infer.threshold,
        "threshold_text": f"foreground where sigmoid(logit), in float32, is >= {infer.threshold}",
        "tiling": {
            "tile": infer.tile,
            "overlap": infer.overlap,
            "gaussian_sigma": infer.tile / 8,
            "weight_floor": GAUSSIAN_FLOOR,
        },
        "tiling_text": f"slices larger than {infer.tile} px are cut into {infer.tile} x "
        f"{infer.tile} windows overlapping by at least {infer.overlap:.0%}, probabilities "
        f"blended with Gaussian weights (sigma = tile / 8), as unetquant segment does",
    }


def onnx_file_metadata(bundle: SegmentationModel, model_path: str) -> dict[str, object]:
    """What an ONNX runtime user needs beside the network (:func:`deployment_metadata`), the
    input and output, and where the model came from."""
    return {
        "source": Path(model_path).name,
        "label": bundle.quant.label,
        "unet": asdict(bundle.unet),
        **deployment_metadata(bundle),
        "input": "image (N, 1, H, W) float32: one slice resampled and normalised as "
        "'preprocess' says; any H and W (padded inside to a multiple of 2**depth)",
        "output": "logits (N, out_classes, H, W) float32; foreground probability = sigmoid(logits)",
        "training": bundle.info,
    }
