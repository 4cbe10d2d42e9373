"""Check a drafter against its target before any server sees it.

    python -m eaglepipe.export.validate results/default/export --target results/default/target
    python -m eaglepipe.export.validate path/to/drafter --target results/default/target --external

PATH is an export dir (with sglang/ and optionally vllm/) or one format dir. Every problem is listed and the
exit status is 1 when there is any, because SGLang silently skips unknown weight names and loads a drafter
that then accepts nothing.

One set of checks at two levels:
- strict (the default, and the export stage): what we ship loads as it is on every SGLang build and on vLLM,
  and its configs equal the training checkpoint's drafter config (`drafter_config.json`, which the export
  stage writes beside sglang/) on every field that changes the drafter's output.
- external (`--external`, and the bench for any drafter dir): the drafter as SGLang 0.5.23 loads it. What that
  build accepts but older builds or vLLM may not (`layers.0.*` names, RoPE only in `rope_parameters`, a
  shipped embedding) is a warning; what breaks serving stays a problem.
Without `drafter_config.json` (a drafter trained elsewhere) the configs are compared with the target only.
Every tensor must be finite at both levels. The checks specific to a drafter family (its layout flags, aux ids,
tensor table) are the family's `check_export` (families/*.py); the config.json's architecture names the family.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from ..families.base import DrafterFamily
from ..families.registry import architectures, export_family, family_named, foreign_family
from ..models.config import DrafterConfig
from ..target.info import describe_model, read_target_info, resolve_model_dir
from .layout import CONFIG_FILE, DRAFTER_CONFIG_FILE, DTYPES, WEIGHTS_FILE, Shapes
from .values import is_int, is_positive_number, same

FORMATS = ("sglang", "vllm")
ENGINE = {"sglang": "SGLang", "vllm": "vLLM"}
LLAMA_INT_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "vocab_size", "max_position_embeddings")
# LlamaConfig derives or defaults these, so a drafter from elsewhere may leave them out
DERIVED_INT_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
# fields that change the drafter's output, compared with the training checkpoint's drafter config
COMPARED_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "vocab_size",
                   "hidden_act")
# fields a drafter usually shares with its target; a difference is right only if the drafter was trained so
TARGET_SHARED_FIELDS = ("rms_norm_eps", "rope_theta", "rope_scaling")
_FLOAT_TAGS = ("BF16", "F16", "F32", "F64")
# safetensors dtype tags of the tensor kinds in export.layout
_SAFETENSORS_TAGS = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", "int64": "I64",
                     "bool": "BOOL"}


@dataclass
class ValidationReport:
    """Outcome of validating one export: the format dirs checked, problems (fatal) and warnings."""

    checked: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    strict: bool = True
    # the drafter_config.json the configs were compared with; None = compared with the target only
    reference: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "strict": self.strict, "reference": self.reference, "checked": self.checked,
                "problems": self.problems, "warnings": self.warnings}

    def moved(self, src: Path, dst: Path) -> "ValidationReport":
        """The report with the paths under `src` (a temp dir about to be renamed) given under `dst`."""
        def move(p: str) -> str:
            path = Path(p)
            return str(dst / path.relative_to(src)) if path.is_relative_to(src) else p

        return dataclasses.replace(self, checked={k: move(v) for k, v in self.checked.items()},
                                   reference=None if self.reference is None else move(self.reference))


def target_facts(target: str | Path) -> dict[str, Any]:
    """Depth, widths, vocab, RoPE and aux layers of the target: its target.json over the model's own config
    (a fetch_target dir), or the model's config alone (an HF model dir)."""
    facts = describe_model(resolve_model_dir(target))
    if (Path(target) / "target.json").exists():
        facts.update(read_target_info(target))
    return facts


def reference_path(path: Path) -> Path | None:
    """The export stage's drafter_config.json for `path`: in an export dir, or beside a format dir of one."""
    dirs = (path, path.parent) if path.name in FORMATS else (path,)
    return next((d / DRAFTER_CONFIG_FILE for d in dirs if (d / DRAFTER_CONFIG_FILE).exists()), None)


class DirCheck:
    """Validation of one format directory; problems and warnings are prefixed with the format name.

    The generic checks are here; the drafter's family (`DrafterFamily.check_export`) adds its own through the
    public methods and attributes: `path`, `fmt`, `target` (the target's facts), `strict`, `bad`, `warn`,
    `not_portable`, `check_one_layer`, `compare` and `check_weights`."""

    def __init__(self, path: Path, target: dict[str, Any], reference: dict[str, Any] | None,
                 expect_dtype: str | None, strict: bool):
        self.path, self.target, self.reference = path, target, reference
        self.expect_dtype, self.strict = expect_dtype, strict
        self.fmt = path.name
        self.family: DrafterFamily | None = None
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def bad(self, msg: str) -> None:
        self.problems.append(f"{self.fmt}: {msg}")

    def warn(self, msg: str) -> None:
        self.warnings.append(f"{self.fmt}: {msg}")

    def not_portable(self, msg: str) -> None:
        """What SGLang 0.5.23 loads correctly but other builds or vLLM may not: fatal only in strict mode."""
        (self.bad if self.strict else self.warn)(msg)

    # ------------------------------------------------------------------ config
    def run(self) -> None:
        cfg_path = self.path / CONFIG_FILE
        try:
            cfg = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            return self.bad(f"{cfg_path} is missing")
        except json.JSONDecodeError as e:
            return self.bad(f"{cfg_path} is not valid JSON ({e})")
        trained_as = None if self.reference is None else self.reference["algorithm"]
        family = export_family(cfg, trained_as)
        if family is None:
            self.bad(f"architectures {cfg.get('architectures')} is none of {architectures()} "
                     "(SGLang picks the drafter's model class from it)")
            foreign = foreign_family(cfg)
            if foreign is None:
                return
            family, self.fmt = foreign  # another trainer's name for a family's drafter: list its other problems
        else:
            self.fmt = family.served_format(cfg, self.path.name)
        self.family = family
        layer = family.layer_config(cfg, self.fmt)
        if not isinstance(layer, dict):
            return self.bad("transformer_layer_config is missing or not a mapping")
        if not self._check_llama_fields(layer):
            return
        family.check_export(self, cfg, layer)

    def _check_llama_fields(self, layer: dict[str, Any]) -> bool:
        ok = True
        for k in LLAMA_INT_FIELDS:
            if k in DERIVED_INT_FIELDS and k not in layer and not self.strict:
                continue
            if not is_int(layer.get(k)) or layer[k] <= 0:
                self.bad(f"{k} must be a positive int, got {layer.get(k)!r}")
                ok = False
        if layer.get("hidden_act", "silu") != "silu":
            self.bad(f"hidden_act must be silu, got {layer.get('hidden_act')!r}")
        if not is_positive_number(layer.get("rms_norm_eps")):
            self.bad(f"rms_norm_eps must be a positive number, got {layer.get('rms_norm_eps')!r}")
        self._check_rope_theta(layer)
        self._check_rope_scaling(layer)
        tie = layer.get("tie_word_embeddings")
        if tie is True or (self.strict and tie is not False):
            self.bad("tie_word_embeddings must be false (true makes lm_head the full-vocab embedding)")
        if ok and layer["vocab_size"] != self.target["vocab_size"]:
            self.bad(f"vocab_size {layer['vocab_size']} != the target's {self.target['vocab_size']}")
        if ok and layer["num_attention_heads"] % layer.get("num_key_value_heads", layer["num_attention_heads"]):
            self.bad("num_attention_heads must be a multiple of num_key_value_heads")
        return ok

    def check_one_layer(self, layer: dict[str, Any]) -> None:
        """The drafter is one decoder layer (`num_hidden_layers` 1), as SGLang builds an EAGLE drafter."""
        layers = layer.get("num_hidden_layers")
        if layers != 1:
            built = f" (SGLang 0.5.23 would build {layers - 1} more decoder layers that no weight fills)" \
                if is_int(layers) and layers > 1 else ""
            self.bad(f"num_hidden_layers must be 1, got {layers!r}{built}; older SGLang builds refuse any other "
                     "value")

    def _check_rope_theta(self, layer: dict[str, Any]) -> None:
        params = layer.get("rope_parameters")
        if "rope_theta" in layer:
            theta = layer["rope_theta"]
        elif self.strict:
            return self.bad("rope_theta must be written explicitly as a positive number (the drafter's trained RoPE)")
        elif isinstance(params, dict) and "rope_theta" in params:
            theta = params["rope_theta"]
            self.warn("rope_theta is only in rope_parameters (transformers 5): SGLang 0.5.23 reads it there, "
                      "builds on transformers 4 would use the default 10000")
        else:
            return self.warn("no rope_theta: the engines use the default 10000")
        if not is_positive_number(theta):
            self.bad(f"rope_theta must be a positive number, got {theta!r}")

    def _check_rope_scaling(self, layer: dict[str, Any]) -> None:
        scaling = layer.get("rope_scaling")
        if "rope_scaling" not in layer:
            if self.strict:
                self.bad("rope_scaling must be written explicitly (null for plain RoPE)")
        elif scaling is not None and not (isinstance(scaling, dict) and ("rope_type" in scaling or "type" in scaling)):
            self.bad(f"rope_scaling must be null or a mapping with rope_type, got {scaling!r}")

    def compare(self, served: dict[str, Any], family_fields: tuple[str, ...],
                target_fields: tuple[str, ...]) -> None:
        """The drafter the engine would build (`served`, DrafterConfig fields) against the training checkpoint's
        config on the Llama fields and the family's `family_fields`, and against the target on the fields a
        drafter shares with it and the family's `target_fields`."""
        ref = self.reference
        if ref is not None and family_named(ref["algorithm"]) is not self.family:
            self.bad(f"the exported drafter is {served['algorithm']} but the training checkpoint is {ref['algorithm']}")
        elif ref is not None:
            for k in COMPARED_FIELDS + family_fields:
                if not same(served[k], ref[k]):
                    self.bad(f"{k} is {served[k]!r} as {ENGINE[self.fmt]} reads this config, but the drafter was "
                             f"trained with {ref[k]!r} ({DRAFTER_CONFIG_FILE})")
        for k in TARGET_SHARED_FIELDS + target_fields:
            if not same(served[k], self.target[k]):
                self.warn(f"{k} {served[k]!r} differs from the target's {self.target[k]!r}: right only if the "
                          "drafter was trained so")

    # ------------------------------------------------------------------ weights
    def check_weights(self, shapes: Shapes, dtype_name: Any) -> None:
        """The weights file against the family's tensor table for `shapes` in this format, in `dtype_name`."""
        path = self.path / WEIGHTS_FILE
        if not path.exists():
            return self.bad(f"{path} is missing")
        float_dtype = None
        if self.strict:
            if dtype_name not in DTYPES:
                self.bad(f"torch_dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
            elif self.expect_dtype and dtype_name != self.expect_dtype:
                self.bad(f"torch_dtype {dtype_name} differs from the requested export dtype {self.expect_dtype}")
            float_dtype = DTYPES.get(dtype_name)
        expected = self.family.export_tensors(shapes, self.fmt)
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # noqa: BLE001 - any unreadable file is a problem to report, not a crash
            return self.bad(f"{path} cannot be read as safetensors ({e})")
        with f:
            names = self._served_names(list(f.keys()))
            for name in sorted(set(names) - set(expected)):
                if name == "embed_tokens.weight" and not self.strict:
                    self._check_shipped_embedding(names[name], tuple(f.get_slice(names[name]).get_shape()))
                    continue
                hint = " (both engines share the target's embedding when hidden sizes match)" \
                    if name == "embed_tokens.weight" else ""
                self.bad(f"unexpected tensor {names[name]}: SGLang skips unknown names silently, vLLM refuses "
                         f"them{hint}")
            for name in sorted(set(expected) - set(names)):
                if name == "t2d" and not self.strict:
                    continue  # both engines ignore t2d
                self.bad(f"missing tensor {name} {list(expected[name][0])}")
            for name in sorted(set(names) & set(expected)):
                shape, kind = expected[name]
                sl = f.get_slice(names[name])
                got_shape = tuple(sl.get_shape())
                if got_shape != shape:
                    self.bad(f"tensor {names[name]} has shape {list(got_shape)}, expected {list(shape)}")
                if kind == "float" and float_dtype is None:
                    if sl.get_dtype() not in _FLOAT_TAGS:
                        self.bad(f"tensor {names[name]} is {sl.get_dtype()}, expected a float dtype")
                else:
                    want = _SAFETENSORS_TAGS.get(float_dtype if kind == "float" else kind)
                    if want is not None and sl.get_dtype() != want:
                        self.bad(f"tensor {names[name]} is {sl.get_dtype()}, expected {want}")
            self._check_finite(f, names.values())
            if "d2t" in names and "d2t" in expected:
                t2d = f.get_tensor(names["t2d"]) if "t2d" in names else None
                self._check_vocab_maps(f.get_tensor(names["d2t"]), t2d, shapes)

    def _served_names(self, stored: list[str]) -> dict[str, str]:
        """Served name -> stored name. Strict mode takes names as written; otherwise they resolve as the engine's
        loader resolves them, with a warning for names old SGLang builds drop."""
        if self.strict:
            return {n: n for n in stored}
        names: dict[str, str] = {}
        for n in stored:
            served = self.family.served_name(n, self.fmt)
            if served in names:
                self.bad(f"tensors {names[served]} and {n} are both loaded as {served}")
            names[served] = n
        layers0 = [n for n in stored if n.removeprefix("model.").startswith("layers.0.")
                   and self.family.served_name(n, self.fmt).startswith("midlayer.")]
        if layers0 and self.fmt == "sglang":
            self.not_portable(f"{len(layers0)} tensors are named layers.0.* rather than midlayer.*: SGLang 0.5.23 "
                              "loads them, older SGLang builds drop them silently and serve an untrained layer")
        return names

    def _check_shipped_embedding(self, name: str, shape: tuple[int, ...]) -> None:
        target = (self.target["vocab_size"], self.target["hidden_size"])
        if shape != target:
            self.bad(f"shipped {name} has shape {list(shape)}, the target's embedding is {list(target)}")
        else:
            self.warn(f"{name} is shipped but unused: SGLang shares the target's embedding when hidden sizes match")

    def _check_finite(self, f: Any, stored: Any) -> None:
        for name in sorted(stored):
            if f.get_slice(name).get_dtype() in _FLOAT_TAGS:
                bad = int((~torch.isfinite(f.get_tensor(name))).sum())
                if bad:
                    self.bad(f"tensor {name} holds {bad} non-finite values (NaN or Inf)")

    def _check_vocab_maps(self, d2t: torch.Tensor, t2d: torch.Tensor | None, shapes: Shapes) -> None:
        if d2t.dim() != 1 or d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
            return self.bad(f"d2t must be a 1-D int64 tensor, got {d2t.dtype} {list(d2t.shape)}")
        ids = torch.arange(d2t.numel()) + d2t.long()
        bad = ((ids < 0) | (ids >= shapes.vocab_size)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            self.bad(f"d2t out of range at {bad.numel()} draft ids (first: draft id {i} -> target id {int(ids[i])}, "
                     f"vocab {shapes.vocab_size})")
            return
        # Both engines map a draft id i to i + d2t[i] and nothing else, so any order and even repeats serve;
        # ascending unique ids are the convention (and what lets t2d describe the vocab exactly)
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            self.not_portable("d2t does not map draft ids to strictly increasing target ids (both engines accept "
                             "any order; the convention is ascending)")
            if ids.unique().numel() != ids.numel():
                self.not_portable(f"d2t maps {ids.numel() - ids.unique().numel()} draft ids onto target ids already "
                                 "mapped: those draft rows are wasted")
        if t2d is not None and t2d.dim() == 1 and t2d.numel() == shapes.vocab_size:
            if int(t2d.sum()) != ids.numel() or not bool(t2d.bool()[ids].all()):
                self.bad("t2d does not mark exactly the target ids that d2t maps to")


def format_dirs(path: Path) -> list[Path]:
    """The format dirs to check under `path`: sglang/ and vllm/ of an export dir, or `path` itself."""
    if (path / CONFIG_FILE).exists():
        return [path]
    return [path / d for d in FORMATS if (path / d).is_dir()]


def _read_reference(path: Path, report: ValidationReport) -> dict[str, Any] | None:
    try:
        return dataclasses.asdict(DrafterConfig.from_json(path))
    except (OSError, ValueError, TypeError) as e:
        report.problems.append(f"{path} cannot be read as a drafter config ({e})")
        return None


def validate_export(path: str | Path, target: str | Path, expect_dtype: str | None = None,
                    strict: bool = True) -> ValidationReport:
    """Validate every format dir under `path` against the target (and the training checkpoint's drafter config
    when the export holds it; strict mode requires it); never raises on bad content."""
    path = Path(path)
    ref_path = reference_path(path)
    report = ValidationReport(strict=strict, reference=None if ref_path is None else str(ref_path))
    try:
        facts = target_facts(target)
    except (FileNotFoundError, ValueError, OSError) as e:
        report.problems.append(f"target: cannot read {target} ({e})")
        return report
    reference = None if ref_path is None else _read_reference(ref_path, report)
    if ref_path is None and strict:
        report.problems.append(f"{path} has no {DRAFTER_CONFIG_FILE} (the training checkpoint's drafter config, "
                               "written by the export stage): nothing to compare the exported configs with")
    dirs = format_dirs(path)
    if not dirs:
        report.problems.append(f"{path} holds neither config.json nor sglang/ or vllm/ export dirs")
    families = []
    for d in dirs:
        check = DirCheck(d, facts, reference, expect_dtype, strict)
        check.run()
        report.checked[check.fmt] = str(d)
        report.problems += check.problems
        report.warnings += check.warnings
        families += [check.family] if check.family is not None else []
    if not (path / CONFIG_FILE).exists():  # an export dir holds its family's first format, what the bench serves
        for primary in dict.fromkeys(f.formats[0] for f in families):
            if primary not in report.checked:
                report.problems.append(f"{path} has no {primary}/ export")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print the problems and return 1 if there are any."""
    p = argparse.ArgumentParser(description="Validate an exported EAGLE drafter against its target.")
    p.add_argument("path", help="export dir (holding sglang/ and vllm/) or one format dir")
    p.add_argument("--target", required=True, help="fetch_target output dir or HF model dir of the target")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="expected weight dtype")
    p.add_argument("--external", action="store_true",
                   help="a drafter from elsewhere: check it as SGLang 0.5.23 loads it (portability issues warn)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = validate_export(args.path, args.target, args.dtype, strict=not args.external)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for fmt, d in report.checked.items():
            print(f"checked {fmt}: {d}")
        print(f"compared with {report.reference}" if report.reference else "compared with the target only")
        for w in report.warnings:
            print(f"warning: {w}")
        for prob in report.problems:
            print(f"problem: {prob}")
        print("OK" if report.ok else f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
