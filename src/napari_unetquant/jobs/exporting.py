"""The export job: a model file into its packed form or its integer network."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import InferConfig
from ..errors import SettingError
from ..infer.engine import has_integer_layers
from ..infer.export import export_integer
from ..infer.export_c import export_c
from ..infer.onnx_graph import export_onnx
from ..infer.predict import GAUSSIAN_FLOOR
from ..infer.qonnx_graph import export_qonnx
from ..modelio import SegmentationModel, load_model, model_classes, save_model
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


EXPORT_FORMATS = ("packed", "integer", "onnx", "qonnx", "c")
ONNX_FORMS = ("auto", "int8", "float")


def export_model(
    model_path: str,
    out_path: str,
    *,
    integer: bool = False,
    format: str = "packed",
    onnx_form: str = "auto",
    input_size: tuple[int, int] | None = None,
) -> Export:
    """Write a model file's packed form (codes at their bit width, BatchNorm folded), its
    integer network for hardware (``integer`` or ``format="integer"``,
    ``docs/integer-format.md``), an ONNX file (``format="onnx"``: the int8 form for models
    with quantized weights and activations unless ``onnx_form`` says ``"float"``), or a QONNX
    file for FINN and hls4ml (``format="qonnx"``: ``Quant`` nodes with each layer's bit widths,
    static input ``(1, 1, *input_size)``, by default one ``tile`` square), or a C99 program of
    the integer network (``format="c"``: ``out_path`` is a new directory; the size reported is
    that of its constant weight data)."""
    if format not in EXPORT_FORMATS:
        raise SettingError(
            f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}", "out"
        )
    if onnx_form not in ONNX_FORMS:
        raise SettingError(f"unknown ONNX form {onnx_form!r}; use {', '.join(ONNX_FORMS)}", "out")
    if integer and format not in ("packed", "integer"):
        raise SettingError(
            f"the integer network and the {format} format are two exports; ask for one", "out"
        )
    if integer:
        format = "integer"
    if input_size is not None and format != "qonnx":
        raise SettingError(
            "an input size applies to the QONNX export only (the other formats take any size)",
            "input_size",
        )
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
    elif format == "qonnx":
        rows, columns = input_size or (InferConfig().tile, InferConfig().tile)
        metadata = qonnx_file_metadata(bundle, model_path, (rows, columns))
        export_qonnx(bundle.model, out_path, metadata, (rows, columns))
        layout = f"QONNX, input {rows} x {columns}"
        notes = (
            "QONNX keeps weights as float initializers (the dequantized codes, as Brevitas "
            "exports do); FINN and hls4ml pack them to the bit widths of its Quant nodes",
        )
    elif format == "c":
        program = export_c(bundle.model, out_path, onnx_file_metadata(bundle, model_path))
        layout = "C99 program: " + ", ".join(program.files)
        float_layers = program.description["float_layers"]
        notes = _float_layer_notes(
            float_layers, len(program.description["layers"]), "it reproduces the integer path"
        )
    elif format == "integer":
        info = {"label": bundle.quant.label, "source": Path(model_path).name, **bundle.info}
        description = export_integer(bundle.model, out_path, info, deployment_metadata(bundle))
        layout = "integer"
        notes = _float_layer_notes(description["float_layers"], len(description["layers"]))
    else:
        save_model(out_path, bundle, packed=True)
        layout = "packed"
    size = program.weight_bytes if format == "c" else Path(out_path).stat().st_size
    return Export(out_path, layout, size, fp32_state_dict_bytes(bundle.unet), notes)


def _float_layer_notes(
    float_layers: list[str], count: int, what: str = "the file is reproducible"
) -> tuple[str, ...]:
    """What the user must know when an integer network keeps float layers."""
    if not float_layers:
        return (f"all {count} layers are integer: {what} bit for bit",)
    return (
        f"{len(float_layers)} of {count} layers compute in float32 ({', '.join(float_layers)}): "
        f"other programs reproduce them only to float rounding, so a few output codes and "
        f"mask pixels can differ; a model trained with its edge layers quantized has none",
    )


def deployment_metadata(bundle: SegmentationModel) -> dict[str, object]:
    """What a runtime needs beside the network, the same in every export: the input's
    preprocessing, the mask rule (:func:`mask_rule`) and the tiling ``unetquant segment`` uses
    (``docs/integer-format.md`` defines each rule exactly)."""
    infer = InferConfig()
    return {
        "preprocess": asdict(bundle.preprocess),
        "preprocess_text": bundle.preprocess.text,
        **mask_rule(bundle),
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


def mask_rule(bundle: SegmentationModel) -> dict[str, object]:
    """How the network's output becomes a mask: a binary model's ``threshold`` (and its words),
    a multi-class model's ``classes`` (the label value of each channel after the background)
    and the argmax rule in words; it has no threshold, so a runtime that expects one fails
    rather than thresholding channel 0."""
    classes = model_classes(bundle)
    if classes is None:
        threshold = InferConfig().threshold
        return {
            "threshold": threshold,
            "threshold_text": f"foreground where sigmoid(logit), in float32, is >= {threshold}",
        }
    return {
        "classes": list(classes),
        "classes_text": f"each pixel takes the channel of the largest logit (softmax "
        f"probabilities are blended between windows): channel 0 is the background (label 0), "
        f"channel i the label value classes[i - 1] ({_channel_values(classes)})",
    }


def _channel_values(classes: tuple[int, ...]) -> str:
    return ", ".join(f"{index}: {value}" for index, value in enumerate(classes, start=1))


def _output_text(bundle: SegmentationModel, shape: str) -> str:
    """The ``output`` metadata entry: logits of ``shape``, and what they mean."""
    if model_classes(bundle) is None:
        return f"logits {shape} float32; foreground probability = sigmoid(logits)"
    return (
        f"logits {shape} float32; class probabilities = softmax(logits) over the channels, "
        f"channel 0 the background, channel i the label value classes[i - 1]"
    )


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
        "output": _output_text(bundle, "(N, out_classes, H, W)"),
        "training": bundle.info,
    }


def qonnx_file_metadata(
    bundle: SegmentationModel, model_path: str, size: tuple[int, int]
) -> dict[str, object]:
    """:func:`onnx_file_metadata` for a QONNX file, whose input has a static ``size``."""
    rows, columns = size
    infer = InferConfig()
    return {
        **onnx_file_metadata(bundle, model_path),
        "tiling": {
            "tile": [rows, columns],
            "overlap": infer.overlap,
            "gaussian_sigma": [rows / 8, columns / 8],
            "weight_floor": GAUSSIAN_FLOOR,
        },
        "tiling_text": f"the graph takes {rows} x {columns} windows: cut larger slices into "
        f"windows overlapping by at least {infer.overlap:.0%} and blend their probabilities "
        f"with Gaussian weights (sigma = window / 8), as unetquant segment does with 512 x 512 "
        f"ones; pad smaller ones",
        "input": f"image (1, 1, {rows}, {columns}) float32: one {rows} x {columns} window of a "
        "slice resampled and normalised as 'preprocess' says (static shape, as FINN and hls4ml "
        "need)",
        "output": _output_text(bundle, f"(1, out_classes, {rows}, {columns})"),
    }
