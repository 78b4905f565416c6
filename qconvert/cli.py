"""The ``qconvert`` command: export, validate, inspect, import, ops-lib."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from .errors import QConvertError

# 0 pass; 1 parity failed (validate only); 2 bad input; 3 validate could not tell (a
# degenerate comparison); 4 an unexpected error (a bug: rerun with --debug, report it).
EXIT_PARITY, EXIT_INPUT, EXIT_INCONCLUSIVE, EXIT_INTERNAL = 1, 2, 3, 4


def _errors_to_exit_codes(command):
    """Bad input: one line on stderr and exit 2; anything unexpected: one line and exit 4
    (never 1, which means a parity failure). --debug shows the traceback instead."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug")
        try:
            return command(*args, **kwargs)
        except QConvertError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_INPUT)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            detail = " ".join(str(exc).split())[:300]
            click.echo(f"error: unexpected {type(exc).__name__}: {detail} (a qconvert bug; "
                       "rerun with --debug for the traceback and report it)", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="qconvert")
def main(debug: bool) -> None:
    """Export low-bit, non-uniformly quantized QAT checkpoints to ONNX and prove parity."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Where to write the .onnx model.")
@click.option("--opset", default=20, show_default=True, help="Default-domain opset (18..22).")
@click.option("--no-functions", is_flag=True,
              help="Leave out the model-local function bodies (the model then needs the "
                   "native library).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--mode", type=click.Choice(["exact", "integer"]), default="exact",
              show_default=True, help="integer: activations and weights as b'-bit integers, "
              "ConvInteger/MatMulInteger and one float rescale per layer (approximate).")
@click.option("--outer-bits", default="8", show_default=True,
              help="Integer mode: b' in 2..8, or 'auto' (smallest meeting --min-agreement on "
                   "--calib).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Integer mode: data to calibrate on and, for --outer-bits auto, to measure "
                   "agreement on.")
@click.option("--min-agreement", default=0.995, show_default=True,
              help="Top-1 agreement --outer-bits auto must reach.")
@click.option("--conv-kernel", type=click.Choice(["standard", "qconvert"]), default="standard",
              show_default=True,
              help="Integer mode: qconvert writes every convolution as one QConvClamp node, "
                   "or in a model with depthwise convolutions those as QDepthwiseConvClamp "
                   "(faster, needs the qconvert library; refused when a convolution cannot "
                   "be); standard keeps ONNX's QDQ convolutions for a stock ONNX Runtime.")
@click.option("--allow-pickle", is_flag=True,
              help="Also load checkpoints holding pickled objects. Unpickling RUNS CODE from "
                   "the file: only for files you trust.")
@click.option("--optimize-for", type=click.Choice(["cpu"]),
              help="Also write ONNX Runtime's optimized model next to OUT (NAME.ort-cpu.onnx): "
                   "for this ORT version and CPU family only.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--report", type=click.Path(path_type=Path), help="Also write it as JSON.")
@_errors_to_exit_codes
def export(checkpoint: Path, out: Path, opset: int, no_functions: bool, force: bool,
           mode: str, outer_bits: str, calib: Path | None, min_agreement: float,
           conv_kernel: str, allow_pickle: bool, optimize_for: str | None, as_json: bool,
           report: Path | None) -> None:
    """Export CHECKPOINT to an ONNX model with qconvert ops and packed low-bit weights."""
    from .checkpoint import load_checkpoint
    from .export.onnx_export import check_output_path, export_checkpoint
    from .inspect_model import inspect_model

    check_output_path(out, force)
    if optimize_for:
        from .optimized_file import optimized_path

        check_output_path(optimized_path(out), force)
    if report is not None and not report.parent.is_dir():
        raise QConvertError(f"{report.parent}: no such directory for {report.name}")
    if mode == "integer" and outer_bits == "auto" and calib is None:
        raise QConvertError("--outer-bits auto needs --calib DATA to measure agreement on")
    if conv_kernel != "standard" and mode != "integer":
        raise QConvertError("--conv-kernel applies to integer mode: add --mode integer")
    started = time.perf_counter()
    ckpt = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
    count = sum(1 for _ in ckpt.layer_specs)
    integer = _outer_bits(ckpt, outer_bits, calib, min_agreement) if mode == "integer" else None
    integer_calib = _integer_calibration(ckpt, calib) if mode == "integer" and calib else None
    with click.progressbar(length=count, label="folding layers", file=sys.stderr) as bar:
        result = export_checkpoint(ckpt, out, opset, not no_functions, force, integer,
                                   integer_calib, progress=lambda _: bar.update(1),
                                   conv_kernel=conv_kernel)
    summary = _export_summary(result, inspect_model(out), time.perf_counter() - started)
    if mode == "integer":
        from .export.integer import integer_summary

        summary["integer"] = integer_summary(result.model)
    summary["coverage"] = ckpt.coverage.to_dict() if ckpt.coverage else None
    if optimize_for:
        from .optimized_file import write_optimized

        path, size = write_optimized(result.model, out, force)
        summary["optimized"] = {"path": str(path), "file_bytes": size}
    if report:
        _write_report(report, json.dumps(summary, indent=2))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for line in ckpt.coverage.lines() if ckpt.coverage else ():
        click.echo(line)
    click.echo(f"{'layer':<28} {'weight':<10} {'act':<10} {'params':>8}")
    for layer in summary["layers"]:
        click.echo(f"{layer['name']:<28} {layer['weight']:<10} {layer['act']:<10} "
                   f"{layer['params']:>8}")
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(summary["qconvert_ops"].items())) or "none"
    click.echo(f"qconvert ops: {ops}")
    click.echo(f"wrote {out}: {_human(summary['file_bytes'])} = "
               f"{summary['size_vs_ideal']:.2f}x ideal packed "
               f"({_human(summary['ideal_bytes'])}), {summary['size_vs_fp32']:.3f}x FP32 "
               f"({_human(summary['fp32_bytes'])}); {summary['seconds']:.1f} s")
    if mode == "integer":
        click.echo(summary["integer"])
    if optimize_for:
        click.echo(f"wrote {summary['optimized']['path']}: "
                   f"{_human(summary['optimized']['file_bytes'])}, ONNX Runtime's optimized "
                   "model, valid only with this onnxruntime version on this CPU family (see "
                   "its metadata)")


def _export_summary(result, info, seconds: float) -> dict:
    return {
        "path": str(result.path),
        "layers": [{"name": layer.name, "weight": f"{layer.weight_kind} {layer.weight_bits}",
                    "act": f"{layer.act_kind} {layer.act_bits}", "params": layer.params}
                   for layer in result.layers],
        "qconvert_ops": info.custom_ops,
        "file_bytes": info.file_bytes, "ideal_bytes": info.ideal_bytes,
        "fp32_bytes": info.fp32_bytes, "size_vs_ideal": info.file_bytes / info.ideal_bytes,
        "size_vs_fp32": info.file_bytes / info.fp32_bytes, "seconds": seconds,
    }


def _integer_calibration(ckpt, calib: Path):
    """Normalised model inputs from --calib, for integer mode's requantized outputs."""
    from . import calib as calib_data
    from .preprocess import prepare_inputs

    data = calib_data.load_calibration(calib, ckpt.input.shape)
    return prepare_inputs(data.x, ckpt.input.shape, ckpt.input.mean, ckpt.input.std,
                          ckpt.input.vocab_size).numpy()


def _outer_bits(ckpt, outer_bits: str, calib: Path | None, min_agreement: float):
    """Integer mode's b': a number, or (``auto``) a function that measures it on the
    exact-mode model."""
    if outer_bits != "auto":
        try:
            bits = int(outer_bits)
        except ValueError:
            raise QConvertError(
                f"--outer-bits must be 2..8 or 'auto', got {outer_bits!r}") from None
        if not 2 <= bits <= 8:
            raise QConvertError(f"--outer-bits {bits} is outside 2..8 (ConvInteger and "
                                "MatMulInteger take 8-bit operands)")
        return bits
    from . import calib as calib_data
    from .integer_search import choose_outer_bits

    data = calib_data.load_calibration(calib, ckpt.input.shape)

    def measure(exact_model) -> int:
        bits, agreements = choose_outer_bits(exact_model, ckpt, data, min_agreement)
        tried = ", ".join(f"b'={b}: {a:.2%}" for b, a in sorted(agreements.items()))
        click.echo(f"outer bits auto: {tried} -> b'={bits}")
        return bits

    return measure


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path),
              help=".npz (x, optional y) / .npy samples, or an image folder.")
@click.option("--synthetic", type=int, help="Use N random samples instead of --calib.")
@click.option("--resize", is_flag=True,
              help="Resize .npz/.npy samples to the model's input size (bilinear); without "
                   "it a different size is an error.")
@click.option("--runtime", type=click.Choice(["native", "function", "reference"]),
              help="Default: native when the library is built, else function.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--per-layer", is_flag=True,
              help="Run the per-layer checks on every sample (default: the first "
                   "64).")
@click.option("--min-agreement", type=float,
              help="Also require this top-1 agreement with PyTorch (integer models: 1.0 "
                   "unless given).")
@click.option("--max-abs-diff", type=float,
              help="Also require max |ONNX - PyTorch| <= this.")
@click.option("--max-rel-diff", type=float,
              help="Also require max |ONNX - PyTorch| <= this x max |output|.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the machine-readable report to stdout (the summary goes to stderr).")
@click.option("--report", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG plot.")
@click.option("--strict", is_flag=True,
              help="Fail when the model was exported from a different checkpoint.")
@click.option("--allow-pickle", is_flag=True, help="See export --help. Runs code from the file.")
@click.option("--task", type=click.Choice(["classification", "segmentation", "regression",
                                           "detection"]),
              help="What the outputs are, for the task measures (default: the model's "
                   "qconvert_task, else [N, C] outputs are class logits and everything else "
                   "values; see docs/validation.md).")
@_errors_to_exit_codes
def validate(checkpoint: Path, model: Path, calib: Path | None, synthetic: int | None,
             resize: bool, runtime: str | None, batch_size: int, per_layer: bool,
             min_agreement: float | None, max_abs_diff: float | None,
             max_rel_diff: float | None, as_json: bool, report: Path | None,
             plot: Path | None, strict: bool, allow_pickle: bool, task: str | None) -> None:
    """Check MODEL against CHECKPOINT and its float64 referee on calibration data.

    Exit 0 PASS, 1 parity FAIL, 2 bad input, 3 INCONCLUSIVE (a degenerate comparison),
    4 an unexpected error.
    """
    from . import calib as calib_data
    from . import manifest
    from . import validate as val
    from .checkpoint import load_checkpoint
    from .runtime import default_runtime, load_model, session
    from .verdict import judge, needs_every_sample

    if (calib is None) == (synthetic is None):
        raise QConvertError("give exactly one of --calib DATA or --synthetic N")
    for path in (report, plot):  # fail now, not after the whole validation
        if path is not None and not path.parent.is_dir():
            raise QConvertError(f"{path.parent}: no such directory for {path.name}")
    echo = functools.partial(click.echo, err=as_json)  # --json keeps stdout for the JSON
    ckpt = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
    onnx_model = load_model(model)
    _check_provenance(ckpt, onnx_model, model, strict)
    data = (calib_data.synthetic(synthetic, ckpt.input.shape,
                                 vocab_size=ckpt.input.vocab_size) if synthetic is not None
            else calib_data.load_calibration(calib, ckpt.input.shape, resize=resize))
    runtime = runtime or default_runtime()
    echo(f"runtime: {runtime}; data: {data.source}, {len(data.x)} samples")
    man = manifest.read(onnx_model)
    if man.mode == "integer":
        from .export.integer import kernel_form
        kernel = f", {kernel_form(onnx_model)}" if man.needs_library else ""
        echo(f"integer model (b'={man.outer_bits}{kernel}): judged on top-1 "
             "agreement with PyTorch; the float64 referee's figures are shown beside")
    with click.progressbar(length=len(data.x), label="validating", file=sys.stderr) as bar:
        result = val.validate(ckpt, onnx_model, data,
                              lambda m: session(m, runtime, announce=None),
                              batch_size=batch_size, per_layer=True if per_layer else None,
                              progress=bar.update, task=task)
    judge(result, min_agreement, max_abs_diff, max_rel_diff)
    if needs_every_sample(result):  # a waiver of the end-to-end checks needs every sample
        echo(f"every layer matches on {result.per_layer_samples} samples but the end-to-end "
             f"checks fail: checking every layer on all {result.samples} samples")
        val.attach_per_layer(result, ckpt, onnx_model, data,
                             lambda m: session(m, runtime, announce=None), batch_size)
        judge(result, min_agreement, max_abs_diff, max_rel_diff)
    _print_report(result, echo)
    if as_json:
        click.echo(result.to_json())
    if report:
        report.write_text(result.to_json())
    if plot:
        val.plot(result, str(plot))
    if result.verdict == "FAIL":
        click.echo(f"FAIL: {result.diagnosis}", err=True)
        sys.exit(EXIT_PARITY)
    if result.verdict == "INCONCLUSIVE":
        click.echo(f"INCONCLUSIVE: {result.diagnosis}", err=True)
        sys.exit(EXIT_INCONCLUSIVE)
    echo(f"PASS: {result.diagnosis}" if result.diagnosis else "PASS")


def _db(value, layer=None) -> str:
    """SQNR cell; in integer mode a missing value means the layer has no such tensor."""
    if value is None:
        return "-" if layer is not None and layer.integer else "exact"
    return f"{value:.1f}"


def _write_report(path: Path, text: str) -> None:
    if not path.parent.is_dir():
        raise QConvertError(f"{path.parent}: no such directory for {path.name}")
    path.write_text(text)


def _check_provenance(ckpt, onnx_model, model_path: Path, strict: bool) -> None:
    from . import manifest

    recorded = manifest.read(onnx_model).checkpoint_sha256
    if recorded and recorded != ckpt.sha256:
        message = (f"{model_path} was exported from a different checkpoint "
                   f"(sha256 {recorded[:12]}..., this one {ckpt.sha256[:12]}...)")
        if strict:
            raise QConvertError(message + "; re-export it, or drop --strict")
        click.echo(f"WARNING: {message}", err=True)


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def _print_report(r, echo=click.echo) -> None:
    agreement = ("" if r.top1_agreement is None else f"  top-1 agreement "
                 f"{_pct(r.top1_agreement)}  top-5 agreement {_pct(r.top5_agreement)}")
    echo(f"samples {r.samples}  outputs {r.output_shapes}{agreement}")
    sqnr = "exact" if r.sqnr_db is None else f"{r.sqnr_db:.1f} dB"
    echo(f"ONNX vs PyTorch fp32: max |diff| {r.max_abs_diff:.3g}  mean |diff| "
         f"{r.mean_abs_diff:.3g}  SQNR {sqnr}  NaN samples {r.nan_samples}")
    for key, d in r.referee.items():
        label = key.replace("torch", "PyTorch fp32").replace("onnx", "ONNX")
        top1 = "" if d.top1_agreement is None else f"  top-1 {_pct(d.top1_agreement)}"
        echo(f"{label + ' vs float64 referee:':<56} max |diff| {d.max_abs_diff:.3g}  mean "
             f"|diff| {d.mean_abs_diff:.3g}  SQNR {_db(d.sqnr_db)} dB{top1}")
    if len(r.outputs) > 1 or r.task != "classification":
        _print_outputs(r, echo)
    for key, found in r.detection.items():
        label = (key.replace("torch", "PyTorch fp32").replace("onnx", "ONNX")
                 + ("" if key == "onnx vs torch" else " vs float64 referee"))
        echo(f"boxes, {label + ':':<48} {found['matched']} matched of {found['reference']} "
             f"reference / {found['detections']} detections, {found['unmatched']} unmatched")
    if r.torch_accuracy is not None:
        echo(f"accuracy: PyTorch {_pct(r.torch_accuracy)}  ONNX {_pct(r.onnx_accuracy)}")
    if r.level_flips:
        f = r.level_flips
        echo(f"quantizer outputs on another level than the referee's ({r.per_layer_samples} "
             f"samples): PyTorch fp32 {f['torch']}, ONNX {f['onnx']} of {f['elements']}")
    if r.layers:
        _print_layers(r, echo)
    for check in r.checks:
        status = "ok  " if check["passed"] else "waived" if check.get("waived") else "FAIL"
        echo(f"{status} {check['name']}: {check['detail']}")
    for problem in r.degenerate:
        echo(f"degenerate: {problem}")


def _print_outputs(r, echo) -> None:
    """One line per output: ONNX and PyTorch fp32 against the referee, task measures."""
    echo(f"task {r.task}; per output (against the float64 referee):")
    for out in r.outputs:
        onnx_d, torch_d = out.referee.get("onnx", out.onnx_vs_torch), out.referee.get("torch")
        line = (f"  {out.name} {out.shape} {out.kind}: mean |diff| ONNX "
                f"{onnx_d.mean_abs_diff:.3g}")
        if torch_d is not None:
            line += f", PyTorch fp32 {torch_d.mean_abs_diff:.3g}"
        line += f"; SQNR ONNX {_db(onnx_d.sqnr_db)} dB"
        if onnx_d.top1_agreement is not None:
            line += f"; top-1 agreement {_pct(onnx_d.top1_agreement)}"
        if onnx_d.pixel_agreement is not None:
            line += (f"; pixel agreement {_pct(onnx_d.pixel_agreement)}, agreement IoU "
                     f"{onnx_d.agreement_iou:.4f}")
        echo(line)


def _print_layers(r, echo) -> None:
    echo(f"per layer ({r.per_layer_samples} samples; level flips = quantizer outputs on "
         "another level than the float64 referee's):")
    echo(f"{'layer':<28} {'act':<5} {'op mismatches':>16} {'weight':>7} {'act SQNR':>9} "
         f"{'out SQNR':>9} {'flips fp32':>10} {'flips ONNX':>10}")
    for layer in r.layers:
        flips = f"{layer.torch_level_flips:>10} {layer.onnx_level_flips:>10}"
        if layer.integer:
            ops = "integer mode"
        elif layer.merged:
            ops = "shared nodes"  # an identical quantizer's nodes, checked there
        else:
            ops = f"{layer.op_mismatches}/{layer.op_elements}"
        echo(f"{layer.name:<28} {layer.act_kind:<5} {ops:>16} {layer.weight_mismatches:>7} "
             f"{_db(layer.act_sqnr_db, layer):>9} {_db(layer.out_sqnr_db, layer):>9} {flips}")


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--report", type=click.Path(path_type=Path), help="Also write it as JSON.")
@_errors_to_exit_codes
def inspect_command(model: Path, as_json: bool, report: Path | None) -> None:
    """Ops, bits, storage and compute of an exported MODEL."""
    from . import manifest
    from .inspect_model import inspect_model
    from .ops import INTEGER_OPS
    from .runtime import load_model

    load_model(model)  # a clear error for a missing or unreadable file
    info = inspect_model(model, macs=True)
    if report:
        _write_report(report, info.to_json())
    if as_json:
        click.echo(info.to_json())
        return
    click.echo(f"{'layer':<34} {'op':<10} {'bits':>4} {'params':>8} {'codes':>9} "
               f"{'table':>7} {'MACs':>10}")
    for layer in info.layers:
        click.echo(f"{layer.layer:<34} {layer.op:<10} {layer.bits:>4} {layer.params:>8} "
                   f"{layer.code_bytes:>9} {layer.table_bytes:>7} {layer.macs:>10}")
    click.echo(f"qconvert ops: {info.custom_ops}")
    click.echo(f"file {info.file_bytes} B = {info.file_bytes / info.ideal_bytes:.3f}x ideal "
               f"({info.ideal_bytes} B), {info.file_bytes / info.fp32_bytes:.3f}x FP32 "
               f"({info.fp32_bytes} B); LUT memory {info.lut_bytes} B")
    click.echo(f"MACs/sample {info.macs}; weight bits {info.weight_bits}")
    if info.metadata.get(manifest.Key.CONV_KERNEL, "standard") != "standard":
        kernels = [op for op in INTEGER_OPS if op in info.custom_ops]
        click.echo(f"convolutions: qconvert {' / '.join(kernels)} nodes; they need the qconvert "
                   "library (without it ONNX Runtime runs their slower function bodies, if "
                   "present)")
    if info.adapter_params:
        click.echo(f"ASQ adapters: {info.adapter_params} params "
                   f"({info.adapter_param_ratio:.2%} of quantized weights), {info.adapter_macs} "
                   f"MACs ({info.adapter_mac_ratio:.2%} of the rest)")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), help="Data for fidelity and int8 "
              "calibration (default: --synthetic 256).")
@click.option("--synthetic", type=int, default=256, show_default=True)
@click.option("--threads", default=1, show_default=True, help="Intra-op threads, all models.")
@click.option("--rounds", default=30, show_default=True, help="Interleaved timing rounds.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the machine-readable result to stdout instead of the table.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the result as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG plot.")
@_errors_to_exit_codes
def bench(checkpoint: Path, calib: Path | None, synthetic: int, threads: int, rounds: int,
          as_json: bool, report: Path | None, plot: Path | None) -> None:
    """Latency, size and fidelity of CHECKPOINT's export against the alternatives: the
    file loaded plainly in ONNX Runtime (library registered) and in qconvert's session,
    the integer-mode file with and without --conv-kernel qconvert, FP32 ONNX, int8 QDQ
    and PyTorch eager, timed in interleaved rounds."""
    from . import bench as bench_mod
    from . import bench_report
    from . import calib as calib_data
    from .checkpoint import load_checkpoint

    for path in (report, plot):  # fail before the slow part
        if path is not None and not path.parent.is_dir():
            raise QConvertError(f"{path.parent}: no such directory for {path.name}")
    ckpt = load_checkpoint(checkpoint)
    data = (calib_data.load_calibration(calib, ckpt.input.shape) if calib
            else calib_data.synthetic(synthetic, ckpt.input.shape))
    result = bench_mod.run_bench(ckpt, data, threads=threads, rounds=rounds,
                                 log=lambda m: click.echo(m, err=True))
    click.echo(result.to_json() if as_json else bench_report.format_table(result))
    if report:
        _write_report(report, result.to_json())
    if plot:
        bench_report.plot(result, str(plot))


@main.command("import")
@click.option("--from", "source", required=True,
              type=click.Choice(["asq-post", "nulsq"]),  # = importers.SOURCES
              help="The training code that wrote CHECKPOINT.")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Where to write the qconvert checkpoint (.pt).")
@click.option("--bits", type=int, help="Bit width, when the file does not record it.")
@click.option("--weights", type=click.Choice(["lsq", "post"]),
              help="asq-post: the weight quantizer (the file cannot tell).")
@click.option("--post-base", type=click.Choice(["2", "sqrt2"]),
              help="asq-post: POST level base (the shipped code uses 2).")
@click.option("--run-params", type=click.Path(path_type=Path),
              help="nulsq: the run's <model>.txt (bits, weight_norm, grad-scale modes).")
@click.option("--first-last-bits", type=int,
              help="nulsq: bit width of the MinMax first and last layers.")
@click.option("--weight-norm", type=click.Choice(["lwn", "none"]),
              help="nulsq: limited weight normalization on (LWN / WN) or off.")
@click.option("--lsq-grad-scale", type=click.Choice(["LSQ_grad_scale", "10_fac", "none"]),
              help="nulsq: the LSQ layers' grad_scale_mode (it sets their forward step).")
@click.option("--minmax", type=click.Choice(["dynamic", "calibrated"]),
              help="nulsq: MinMax first/last layers per sample (dynamic, the default: the "
                   "source at batch size 1) or fixed ranges taken on --calib.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="nulsq with --minmax calibrated: the data to take the ranges on.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@_errors_to_exit_codes
def import_command(source: str, checkpoint: Path, out: Path, bits: int | None,
                   weights: str | None, post_base: str | None, run_params: Path | None,
                   first_last_bits: int | None, weight_norm: str | None,
                   lsq_grad_scale: str | None, minmax: str | None, calib: Path | None,
                   force: bool) -> None:
    """Convert a CHECKPOINT trained with public QAT code into a qconvert checkpoint."""
    from .checkpoint import save_checkpoint
    from .importers import ImportOptions, import_checkpoint

    if out.exists() and not force:
        raise QConvertError(f"{out}: exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise QConvertError(f"{out.parent}: no such directory for {out.name}")
    nulsq_only = {"--run-params": run_params, "--first-last-bits": first_last_bits,
                  "--weight-norm": weight_norm, "--lsq-grad-scale": lsq_grad_scale,
                  "--minmax": minmax, "--calib": calib}
    given = {"asq-post": [k for k, v in nulsq_only.items() if v is not None],
             "nulsq": [k for k, v in {"--weights": weights, "--post-base": post_base}.items()
                       if v is not None]}[source]
    if given:
        raise QConvertError(f"{given[0]} does not apply to --from {source}; drop it")
    result = import_checkpoint(source, checkpoint, ImportOptions(
        bits, weights, post_base, run_params, first_last_bits, weight_norm, lsq_grad_scale,
        minmax, calib))
    save_checkpoint(out, result.model, arch=result.arch, arch_kwargs=result.arch_kwargs,
                    input_shape=result.input_shape, mean=result.mean, std=result.std,
                    training=result.training)
    for note in result.notes:
        click.echo(note)
    click.echo(f"wrote {out} (arch {result.arch}, input {list(result.input_shape)})")


@main.command("ops-lib")
def ops_lib() -> None:
    """Print the native custom-op library's path (exit 2 when there is none)."""
    import os

    from .native import ENV_VAR, ops_library_path

    path = ops_library_path()
    if path is None:
        override = os.environ.get(ENV_VAR)
        if override:
            message = (f"the native library is not built at ${ENV_VAR}={override}; "
                       f"point {ENV_VAR} at libqconvert_ops.so or unset it")
        else:
            message = ("the native library is not built; reinstall qconvert (pip install .) "
                       "or run `make ops` in a source checkout")
        click.echo(f"error: {message}", err=True)
        sys.exit(EXIT_INPUT)
    click.echo(str(path))
