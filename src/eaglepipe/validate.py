"""Check an exported drafter against its target before any server sees it.

    python -m eaglepipe.validate results/default/export --target results/default/target

PATH is an export dir (with sglang/ and optionally vllm/) or one format dir. Every problem is listed and the
exit status is 1 when there is any, because SGLang silently skips unknown weight names and loads a drafter
that then accepts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from .export.layout import (CONFIG_FILE, DTYPES, SGLANG_EAGLE1_ARCH, SGLANG_EAGLE3_ARCH, TOKEN_MAP_FILE,
                            VLLM_EAGLE3_ARCH, WEIGHTS_FILE, Shapes, expected_tensors)
from .target.info import describe_model, resolve_model_dir

LLAMA_INT_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "vocab_size", "max_position_embeddings")
# safetensors dtype tags of the tensor kinds in export.layout
_SAFETENSORS_TAGS = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", "int64": "I64",
                     "bool": "BOOL"}
_ARCH_FORMATS = {SGLANG_EAGLE3_ARCH: ("sglang", "eagle3"), SGLANG_EAGLE1_ARCH: ("sglang", "eagle1"),
                 VLLM_EAGLE3_ARCH: ("vllm", "eagle3")}


@dataclass
class ValidationReport:
    """Outcome of validating one export: the format dirs checked, problems (fatal) and warnings."""

    checked: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "problems": self.problems, "warnings": self.warnings}


def target_facts(target: str | Path) -> dict[str, Any]:
    """Depth, widths and vocab of the target (a fetch_target dir or an HF model dir)."""
    return describe_model(resolve_model_dir(target))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _DirCheck:
    """Validation of one format directory; problems are prefixed with the format name."""

    def __init__(self, path: Path, target: dict[str, Any], expect_aux: Sequence[int] | None,
                 expect_dtype: str | None):
        self.path, self.target, self.expect_aux, self.expect_dtype = path, target, expect_aux, expect_dtype
        self.fmt = path.name
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def bad(self, msg: str) -> None:
        self.problems.append(f"{self.fmt}: {msg}")

    # ------------------------------------------------------------------ config
    def run(self) -> None:
        cfg_path = self.path / CONFIG_FILE
        try:
            cfg = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            return self.bad(f"{cfg_path} is missing")
        except json.JSONDecodeError as e:
            return self.bad(f"{cfg_path} is not valid JSON ({e})")
        arch = (cfg.get("architectures") or [None])[0]
        if arch not in _ARCH_FORMATS:
            return self.bad(f"architectures {cfg.get('architectures')} is none of {sorted(_ARCH_FORMATS)}")
        self.fmt, family = _ARCH_FORMATS[arch]
        layer = cfg.get("transformer_layer_config") if self.fmt == "vllm" else cfg
        if not isinstance(layer, dict):
            return self.bad("transformer_layer_config is missing or not a mapping")
        if not self._check_llama_fields(layer):
            return
        if self.fmt == "vllm":
            self._check_speculators(cfg)
        if family == "eagle3":
            shapes = self._eagle3_shapes(cfg, layer)
        else:
            shapes = self._eagle1_shapes(layer)
        if shapes is not None:
            dtype = layer.get("torch_dtype") or cfg.get("torch_dtype")
            self._check_weights(shapes, dtype)
        if family == "eagle1":
            self._check_token_map(layer)

    def _check_llama_fields(self, layer: dict[str, Any]) -> bool:
        ok = True
        for k in LLAMA_INT_FIELDS:
            if not _is_int(layer.get(k)) or layer[k] <= 0:
                self.bad(f"{k} must be a positive int, got {layer.get(k)!r}")
                ok = False
        if layer.get("num_hidden_layers") != 1:
            self.bad(f"num_hidden_layers must be 1 (old SGLang builds refuse others), got {layer.get('num_hidden_layers')!r}")
        if layer.get("hidden_act", "silu") != "silu":
            self.bad(f"hidden_act must be silu, got {layer.get('hidden_act')!r}")
        if not isinstance(layer.get("rms_norm_eps"), (int, float)):
            self.bad("rms_norm_eps is missing")
        theta = layer.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            self.bad(f"rope_theta must be written explicitly as a positive number (the drafter's trained RoPE), got {theta!r}")
        if "rope_scaling" not in layer:
            self.bad("rope_scaling must be written explicitly (null for plain RoPE)")
        elif layer["rope_scaling"] is not None and not (
                isinstance(layer["rope_scaling"], dict) and ("rope_type" in layer["rope_scaling"] or "type" in layer["rope_scaling"])):
            self.bad(f"rope_scaling must be null or a mapping with rope_type, got {layer['rope_scaling']!r}")
        if layer.get("tie_word_embeddings") is not False:
            self.bad("tie_word_embeddings must be false (true makes lm_head the full-vocab embedding)")
        if ok and layer["vocab_size"] != self.target["vocab_size"]:
            self.bad(f"vocab_size {layer['vocab_size']} != the target's {self.target['vocab_size']}")
        if ok and layer["num_attention_heads"] % layer["num_key_value_heads"]:
            self.bad("num_attention_heads must be a multiple of num_key_value_heads")
        return ok

    def _check_speculators(self, cfg: dict[str, Any]) -> None:
        if cfg.get("speculators_model_type") != "eagle3":
            self.bad(f"speculators_model_type must be eagle3, got {cfg.get('speculators_model_type')!r}")
        if cfg.get("norm_before_residual") is not False:
            self.bad("norm_before_residual must be false explicitly (speculators defaults it to true)")
        sc = cfg.get("speculators_config")
        try:
            tokens = sc["proposal_methods"][0]["speculative_tokens"]
            verifier = sc["verifier"]
            name = verifier["name_or_path"]
        except (KeyError, IndexError, TypeError):
            return self.bad("speculators_config needs proposal_methods[0].speculative_tokens and verifier.name_or_path")
        if sc.get("algorithm") != "eagle3":
            self.bad(f"speculators_config.algorithm must be eagle3, got {sc.get('algorithm')!r}")
        if not _is_int(tokens) or tokens < 1:
            self.bad(f"speculative_tokens must be a positive int, got {tokens!r}")
        if not isinstance(name, str) or not name:
            self.bad("speculators_config.verifier.name_or_path is empty")
        if not isinstance(verifier.get("architectures"), list) or not verifier["architectures"]:
            self.bad("speculators_config.verifier.architectures must list the target's architecture")

    def _aux_ids(self, cfg: dict[str, Any]) -> list[int] | None:
        """The aux layers as h-indices, after checking both conventions; None when unusable."""
        n = self.target["num_layers"]
        top = cfg.get("eagle_aux_hidden_state_layer_ids")
        if not (isinstance(top, list) and top and all(_is_int(i) for i in top)):
            self.bad(f"top-level eagle_aux_hidden_state_layer_ids (vLLM, h-indices) must be a list of ints, got {top!r}")
            return None
        if self.fmt == "sglang":
            nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
            if not (isinstance(nested, list) and all(_is_int(i) for i in nested)):
                self.bad("eagle_config.eagle_aux_hidden_state_layer_ids (SGLang reads only this) must be a list of ints")
                return None
            if [i + 1 for i in nested] != top:
                self.bad(f"aux ids disagree: nested eagle_config {nested} must equal top-level {top} minus 1 "
                         "(SGLang adds 1 to the nested ids; vLLM uses the top-level ids as they are)")
            if (cfg.get("eagle_config") or {}).get("use_aux_hidden_state") is False:
                self.bad("eagle_config.use_aux_hidden_state is false: SGLang would not feed aux hidden states")
        out_of_range = [i for i in top if not 1 <= i <= n - 1]
        if out_of_range:
            self.bad(f"aux h-indices {out_of_range} are outside 1..{n - 1} for a {n}-layer target")
        if top != sorted(top):
            self.warnings.append(f"{self.fmt}: aux h-indices {top} are not ascending (the convention is low, mid, high)")
        if self.expect_aux is not None and list(self.expect_aux) != top:
            self.bad(f"aux h-indices {top} differ from the drafter's training aux layers {list(self.expect_aux)}")
        return top

    def _eagle3_shapes(self, cfg: dict[str, Any], layer: dict[str, Any]) -> Shapes | None:
        dv, th = cfg.get("draft_vocab_size"), cfg.get("target_hidden_size")
        ok = True
        if not _is_int(dv) or not 1 <= dv <= layer["vocab_size"]:
            self.bad(f"draft_vocab_size must be present and in 1..vocab_size (SGLang fails without it), got {dv!r}")
            dv = self._lm_head_rows()  # keep checking the other tensors against the shipped lm_head
            ok = dv is not None
        if not _is_int(th):
            self.bad(f"target_hidden_size must be present, got {th!r}")
            ok = False
        elif th != self.target["hidden_size"]:
            self.bad(f"target_hidden_size {th} != the target's hidden size {self.target['hidden_size']}")
        aux = self._aux_ids(cfg)
        if not ok or aux is None:
            return None
        return Shapes(algorithm="eagle3.1" if cfg.get("fc_norm") else "eagle3", hidden_size=layer["hidden_size"],
                      intermediate_size=layer["intermediate_size"], num_heads=layer["num_attention_heads"],
                      num_kv_heads=layer["num_key_value_heads"], head_dim=layer["head_dim"],
                      vocab_size=layer["vocab_size"], draft_vocab_size=dv, target_hidden_size=th, num_aux=len(aux),
                      fc_norm=bool(cfg.get("fc_norm")))

    def _lm_head_rows(self) -> int | None:
        try:
            with safe_open(str(self.path / WEIGHTS_FILE), framework="pt") as f:
                return int(f.get_slice("lm_head.weight").get_shape()[0]) if "lm_head.weight" in f.keys() else None
        except Exception:  # noqa: BLE001 - an unreadable file is reported by _check_weights
            return None

    def _eagle1_shapes(self, layer: dict[str, Any]) -> Shapes:
        h = layer["hidden_size"]
        if h != self.target["hidden_size"]:
            self.bad(f"an EAGLE-1/2 drafter must have the target's hidden size {self.target['hidden_size']}, got {h}")
        return Shapes(algorithm="eagle1", hidden_size=h, intermediate_size=layer["intermediate_size"],
                      num_heads=layer["num_attention_heads"], num_kv_heads=layer["num_key_value_heads"],
                      head_dim=layer["head_dim"], vocab_size=layer["vocab_size"], draft_vocab_size=layer["vocab_size"],
                      target_hidden_size=h, num_aux=1, fc_norm=False)

    # ------------------------------------------------------------------ weights
    def _check_weights(self, shapes: Shapes, dtype_name: Any) -> None:
        path = self.path / WEIGHTS_FILE
        if not path.exists():
            return self.bad(f"{path} is missing")
        if dtype_name not in DTYPES:
            self.bad(f"torch_dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
        elif self.expect_dtype and dtype_name != self.expect_dtype:
            self.bad(f"torch_dtype {dtype_name} differs from the requested export dtype {self.expect_dtype}")
        float_dtype = DTYPES.get(dtype_name)
        expected = expected_tensors(shapes, self.fmt)
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # noqa: BLE001 - any unreadable file is a problem to report, not a crash
            return self.bad(f"{path} cannot be read as safetensors ({e})")
        with f:
            names = set(f.keys())
            for name in sorted(names - set(expected)):
                hint = " (both engines share the target's embedding when hidden sizes match)" \
                    if name == "embed_tokens.weight" else ""
                self.bad(f"unexpected tensor {name}: SGLang skips unknown names silently, vLLM refuses them{hint}")
            for name in sorted(set(expected) - names):
                self.bad(f"missing tensor {name} {list(expected[name][0])}")
            for name in sorted(names & set(expected)):
                shape, kind = expected[name]
                sl = f.get_slice(name)
                got_shape = tuple(sl.get_shape())
                if got_shape != shape:
                    self.bad(f"tensor {name} has shape {list(got_shape)}, expected {list(shape)}")
                want = _SAFETENSORS_TAGS.get(float_dtype if kind == "float" else kind)
                if want is not None and sl.get_dtype() != want:
                    self.bad(f"tensor {name} is {sl.get_dtype()}, expected {want}")
            if "d2t" in names and "d2t" in expected:
                self._check_vocab_maps(f.get_tensor("d2t"), f.get_tensor("t2d") if "t2d" in names else None, shapes)

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
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            self.bad("d2t must map draft ids to strictly increasing target ids")
        if t2d is not None and t2d.dim() == 1 and t2d.numel() == shapes.vocab_size:
            if int(t2d.sum()) != ids.numel() or not bool(t2d.bool()[ids].all()):
                self.bad("t2d does not mark exactly the target ids that d2t maps to")

    def _check_token_map(self, layer: dict[str, Any]) -> None:
        path = self.path / TOKEN_MAP_FILE
        if not path.exists():
            return
        try:
            ids = torch.as_tensor(torch.load(path, weights_only=True))
        except Exception as e:  # noqa: BLE001 - report, do not crash
            return self.bad(f"{path} cannot be loaded with torch.load(weights_only=True) ({e})")
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.numel() == 0:
            return self.bad(f"{TOKEN_MAP_FILE} must be a non-empty 1-D list of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= layer["vocab_size"]:
            self.bad(f"{TOKEN_MAP_FILE} holds ids outside 0..{layer['vocab_size'] - 1}")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            self.bad(f"{TOKEN_MAP_FILE} ids must be strictly increasing")


def format_dirs(path: Path) -> list[Path]:
    """The format dirs to check under `path`: sglang/ and vllm/ of an export dir, or `path` itself."""
    if (path / CONFIG_FILE).exists():
        return [path]
    return [path / d for d in ("sglang", "vllm") if (path / d).is_dir()]


def validate_export(path: str | Path, target: str | Path, expect_aux: Sequence[int] | None = None,
                    expect_dtype: str | None = None) -> ValidationReport:
    """Validate every format dir under `path` against the target; never raises on bad content."""
    path = Path(path)
    report = ValidationReport()
    try:
        facts = target_facts(target)
    except (FileNotFoundError, ValueError, OSError) as e:
        report.problems.append(f"target: cannot read {target} ({e})")
        return report
    dirs = format_dirs(path)
    if not dirs:
        report.problems.append(f"{path} holds neither config.json nor sglang/ or vllm/ export dirs")
    for d in dirs:
        check = _DirCheck(d, facts, expect_aux, expect_dtype)
        check.run()
        report.checked[check.fmt] = str(d)
        report.problems += check.problems
        report.warnings += check.warnings
    if not (path / CONFIG_FILE).exists() and "sglang" not in report.checked:
        report.problems.append(f"{path} has no sglang/ export")
    return report


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print the problems and return 1 if there are any."""
    p = argparse.ArgumentParser(description="Validate an exported EAGLE drafter against its target.")
    p.add_argument("path", help="export dir (holding sglang/ and vllm/) or one format dir")
    p.add_argument("--target", required=True, help="fetch_target output dir or HF model dir of the target")
    p.add_argument("--aux-layers", type=_parse_ints, default=None,
                   help="expected aux layers as HF hidden_states indices, e.g. 2,15,27")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="expected weight dtype")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = validate_export(args.path, args.target, args.aux_layers, args.dtype)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for fmt, d in report.checked.items():
            print(f"checked {fmt}: {d}")
        for w in report.warnings:
            print(f"warning: {w}")
        for prob in report.problems:
            print(f"problem: {prob}")
        print("OK" if report.ok else f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
