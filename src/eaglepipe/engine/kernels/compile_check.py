"""Compile every Triton kernel (the token path's and speculative decoding's) for a CUDA architecture without a
GPU (Triton ships ptxas).

    python -m eaglepipe.engine.kernels.compile_check --arch 90

The CPU tests run the kernels under Triton's interpreter, which accepts code the real compiler rejects (dot
shapes, mixed pointer types, loop-carried types). This compiles each kernel as the engine launches it, for bf16
and fp32 and every constexpr variant, so such errors show before a GPU is at hand. Run without
TRITON_INTERPRET (the interpreter replaces the compiled functions).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...speculative.kernels import draft_tree, topk
from . import attention, compact, linear, rope_cache


def _sig(pointers: dict[str, str], ints: list[str], floats: list[str], constexprs: dict[str, Any]) -> tuple:
    signature = dict(pointers)
    signature.update({n: "i32" for n in ints})
    signature.update({n: "fp32" for n in floats})
    signature.update({n: "constexpr" for n in constexprs})
    return signature, constexprs


def variants(dtype: str) -> list[tuple[Any, dict, dict]]:
    """(kernel, signature, constexprs) for every launch the engine makes, with activations in `dtype`."""
    out = []
    # the target's layers (with biases), then the drafters' bias-free o/down, gate/up and EAGLE-3 lm_head, and
    # EAGLE-1's fc (with its bias), qkv and target lm_head over fp32 logits
    for norm, bias, res, gate_up, y in [(1, 1, 0, 0, dtype), (0, 1, 1, 0, dtype), (1, 1, 0, 1, dtype),
                                        (0, 0, 1, 0, dtype), (1, 0, 0, 1, dtype), (1, 0, 0, 0, "fp32"),
                                        (0, 1, 0, 0, dtype), (0, 0, 0, 0, dtype), (0, 0, 0, 0, "fp32")]:
        pointers = {n: f"*{dtype}" for n in ("x_ptr", "g_ptr", "w_ptr", "b_ptr", "r_ptr")} | {"y_ptr": f"*{y}"}
        out.append((linear.norm_linear_kernel, *_sig(
            pointers, ["M", "N", "K", "stride_xm", "stride_wn", "stride_rm", "stride_ym"], ["eps"],
            {"HAS_NORM": norm, "HAS_BIAS": bias, "HAS_RES": res, "GATE_UP": gate_up, "USE_DOT": True,
             "BM": linear.ROW_TILE, "BN": 32, "BK": 256})))
    pointers = {"ids_ptr": "*i64"} | {n: f"*{dtype}" for n in ("e_ptr", "ge_ptr", "h_ptr", "gh_ptr", "w_ptr", "y_ptr")}
    out.append((linear.embed_hidden_linear_kernel, *_sig(
        pointers, ["M", "N", "H", "stride_e", "stride_h", "stride_wn", "stride_ym"], ["eps"],
        {"USE_DOT": True, "BM": linear.ROW_TILE, "BN": 32, "BK": 256})))
    for qk_norm in (False, True):
        pointers = {n: f"*{dtype}" for n in ("qkv_ptr", "cos_ptr", "sin_ptr")}
        pointers |= {"pos_ptr": "*i64", "slot_ptr": "*i64", "wpos_ptr": "*i64"}
        pointers |= {n: f"*{dtype}" for n in ("qk_gain_ptr", "q_ptr", "kc_ptr", "vc_ptr")}
        out.append((rope_cache.rope_write_kernel, *_sig(
            pointers, ["stride_qkv", "stride_rope", "stride_qm", "stride_qh", "stride_cs", "stride_ch", "stride_cp"],
            ["eps"], {"HQ": 9, "HKV": 3, "D": 64, "HALF": 32, "QK_NORM": qk_norm})))
    pointers = {n: f"*{dtype}" for n in ("q_ptr", "kc_ptr", "vc_ptr")}
    pointers |= {n: "*i64" for n in ("slot_ptr", "plen_ptr", "anc_ptr", "cnt_ptr")}
    pointers |= {n: "*fp32" for n in ("m_ptr", "l_ptr", "o_ptr")}
    out.append((attention.chunk_kernel, *_sig(
        pointers, ["stride_qm", "stride_qh", "stride_cs", "stride_ch", "stride_cp", "stride_anc", "stride_sm",
                   "stride_sh", "stride_om", "stride_oh", "stride_oc"], ["scale"],
        {"G": 3, "GP": 16, "D": 64, "DP": 64, "C": attention.CHUNK})))
    pointers = {n: "*fp32" for n in ("m_ptr", "l_ptr", "o_ptr")} | {"plen_ptr": "*i64", "cnt_ptr": "*i64"}
    pointers |= {"out_ptr": f"*{dtype}"}
    out.append((attention.merge_kernel, *_sig(
        pointers, ["stride_sm", "stride_sh", "stride_om", "stride_oh", "stride_oc", "stride_out"], [],
        {"D": 64, "DP": 64, "C": attention.CHUNK})))
    chunk_out = {"cval_ptr": "*fp32", "cidx_ptr": "*i64", "cmax_ptr": "*fp32", "csum_ptr": "*fp32"}
    out.append((topk.chunk_topk_kernel, *_sig(
        {"x_ptr": f"*{dtype}"} | chunk_out, ["V", "stride_x", "C"], [], {"K": 8, "BLOCK": topk.CHUNK})))
    out.append((topk.merge_topk_kernel, *_sig(
        chunk_out | {"val_ptr": "*fp32", "idx_ptr": "*i64"}, ["C"], [], {"K": 8, "CP": 16, "NP": 128})))
    grow_pointers = {n: "*fp32" for n in ("fscore_ptr", "lp_ptr")} | {n: "*i64" for n in ("ids_ptr", "d2t_ptr")}
    grow_pointers |= {"hid_ptr": f"*{dtype}"} | {n: "*i64" for n in ("fcand_ptr", "vis_ptr", "slot_ptr", "len_ptr",
                                                                    "ctok_ptr")}
    grow_pointers |= {"cscore_ptr": "*fp32", "cpar_ptr": "*i64"}
    grow_ints = ["n_cand", "first_new", "next_start"]
    grow_outputs = {"o_score_ptr": "*fp32"} | {n: "*i64" for n in ("o_cand_ptr", "o_slot_ptr", "o_ids_ptr")}
    grow_outputs |= {"o_hid_ptr": f"*{dtype}"} | {n: "*i64" for n in ("o_pos_ptr", "o_write_ptr", "o_prefix_ptr",
                                                                      "o_vis_ptr", "o_count_ptr")}
    strides = ["H", "s_fs", "s_lp_b", "s_lp_f", "s_ids_b", "s_ids_f", "s_hid_b", "s_hid_f", "s_fc", "s_vis_b",
               "s_vis_f"]
    for f, d, d2t in [(1, 0, True), (8, 3, True), (8, 5, False)]:  # the root's expansion, then later depths
        signature = dict(grow_pointers)
        signature.update({n: "i32" for n in grow_ints})
        signature.update(grow_outputs)
        signature.update({n: "i32" for n in strides})
        constexprs = {"F": f, "K": 8, "D": d, "HAS_D2T": d2t, "NB": 8 * f, "HB": 1024, "DB": 1 << d.bit_length()}
        signature.update({n: "constexpr" for n in constexprs})
        out.append((draft_tree.tree_grow_kernel, signature, constexprs))
    select_pointers = {"score_ptr": "*fp32"} | {n: "*i64" for n in ("tok_ptr", "par_ptr", "depth_ptr", "root_ptr",
                                                                    "pos_ptr", "o_tok_ptr", "o_par_ptr",
                                                                    "o_depth_ptr")}
    out.append((draft_tree.tree_select_kernel, *_sig(select_pointers | {"o_anc_ptr": "*i8"}, ["C", "keep", "max_depth"],
                                                 [], {"CB": 512, "SB": 32})))
    out.append((draft_tree.tree_accept_kernel, *_sig(
        {n: "*i64" for n in ("tok_ptr", "par_ptr", "depth_ptr")} | {"anc_ptr": "*i8", "choice_ptr": "*i64"}
        | {n: "*i64" for n in ("o_path_ptr", "o_count_ptr", "o_bonus_ptr")}, ["S", "W"], [], {"SB": 32, "WB": 8})))
    out.append((compact.compact_kv_kernel, *_sig(
        {"kc_ptr": f"*{dtype}", "vc_ptr": f"*{dtype}"} | {n: "*i64" for n in ("slot_ptr", "len_ptr", "path_ptr")},
        ["W", "stride_l", "stride_s", "stride_h", "stride_p"], [], {"HEADS": 3, "D": 64, "WB": 8, "DB": 64})))
    return out


def compile_all(arch: int = 90) -> list[str]:
    """Compile every variant for sm_<arch>; returns one line per kernel with its cubin size."""
    target = GPUTarget("cuda", arch, 32)
    lines = []
    for dtype in ("bf16", "fp32"):
        for kernel, signature, constexprs in variants(dtype):
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
            lines.append(f"{kernel.__name__} {dtype} {constexprs}: {len(compiled.asm['cubin'])} bytes of cubin")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    args = ap.parse_args(argv)
    for line in compile_all(args.arch):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
