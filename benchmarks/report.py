"""Markdown tables from the suite's JSON (printed, and pasted into BENCHMARKS.md)."""

from __future__ import annotations

from typing import List


def _t(rows: List[list], header: list) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(v, digits=2, unit=""):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}{unit}"


def machine(m: dict) -> str:
    peak = m.get("nominal_peak") or {}
    gemm = m.get("gemm_peak") or {}
    rows = [["CPU", f"{m['cpu_model']} (family {m['cpu_family']}, model {m['cpu_model_number']}), "
             f"{m['cpu_mhz_reported']:.0f} MHz reported"],
            ["CPUs usable / torch threads", f"{m['logical_cpus_usable']} / {m['torch_threads']}"],
            ["memory", _f(m.get("memory_gib"), 1, " GiB")],
            ["ISA", ", ".join(m["isa"])], ["GPU", m["gpu"]],
            ["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items())],
            ["nominal peak", f"{_f(peak.get('fp32_gflops'), 0)} GFLOP/s fp32, {_f(peak.get('bf16_gflops'), 0)} "
             f"bf16 ({peak.get('assumption', 'unknown CPU')})"],
            ["measured GEMM peak", f"{_f(gemm.get('fp32_gflops'), 0)} GFLOP/s fp32, "
             f"{_f(gemm.get('bf16_gflops'), 0)} bf16 ({gemm.get('n')}³ torch.mm)"],
            ["load average at start (1, 5, 15 min)", ", ".join(map(str, m.get("load_average_at_start", [])))]]
    return _t(rows, ["machine", ""])


def inference(s: dict) -> str:
    out = []
    for overlap, row in s["by_overlap"].items():
        rows = []
        for name in ("ours", "ours_constant", "ours_body_grid", "monai_gaussian", "monai_constant",
                     "monai_gaussian_reused_memory", "torchio"):
            if name not in row:
                continue
            r = row[name]
            dice = r.get("dice_vs_monai_constant_fp32", {})
            same = r.get("dice_vs_monai_same_weighting_fp32", {}).get("labels")
            rows.append([name, _f(r["seconds_median"], 1), " / ".join(_f(v, 1) for v in r["seconds_all"]),
                         _f(r["peak_rss_added_mib"], 0), _f(r["peak_rss_mib"], 0),
                         _f(dice.get("labels"), 4) if name != "monai_constant" else "(reference)",
                         _f(dice.get("liver"), 4), _f(dice.get("tumor"), 4),
                         _f(same, 4) if same is not None else "–"])
        patches = row.get("patches", {})
        out.append(f"Overlap {float(overlap):.4f} ({patches.get('total', '?')} patches on the grid; ours "
                   f"computed {patches.get('ours', '?')}, ours_body_grid {patches.get('ours_body_grid', '?')})\n")
        out.append(_t(rows, ["competitor", "median s", "all reps s", "peak RSS added MiB", "peak RSS MiB",
                             "label Dice vs MONAI const fp32", "liver", "tumor",
                             "label Dice vs MONAI gaussian fp32 (same weighting)"]))
        d = row["max_abs_diff"]
        out.append("\nratios (ours / theirs): MONAI gaussian {}, MONAI constant {}, TorchIO {}; "
                   "peak RSS added vs MONAI {}".format(
                       _f(row["ratio_vs_monai_gaussian"], 3), _f(row["ratio_vs_monai_constant"], 3),
                       _f(row["ratio_vs_torchio"], 3), _f(row["rss_ratio_vs_monai"], 3)))
        if "ratio_vs_monai_same_allocator" in row:
            out.append("against MONAI gaussian with the engine's allocator setting (monai_gaussian_reused_memory): "
                       "{}".format(_f(row["ratio_vs_monai_same_allocator"], 3)))
        if "body_grid" in row:
            v = row["body_grid"]
            out.append("ours_body_grid (--window-grid body): MONAI {}, TorchIO {}; peak RSS "
                       "added vs MONAI {}".format(_f(v["ratio_vs_monai"], 3), _f(v["ratio_vs_torchio"], 3),
                                                  _f(v["rss_ratio_vs_monai"], 3)))
        out.append("max |logit difference|: " + ", ".join(f"{k} {_f(v, 6) if isinstance(v, float) else v}"
                                                          for k, v in d.items()) + "\n")
    out.append(f"**inference.ratio_vs_monai = {s['ratio_vs_monai']:.3f}, inference.ratio_vs_torchio = "
               f"{s['ratio_vs_torchio']:.3f}** ({s['headline']})")
    if s.get("ratio_vs_monai_same_allocator") is not None:
        out.append(f"Against MONAI gaussian given the engine's allocator setting: "
                   f"{s['ratio_vs_monai_same_allocator']:.3f} (the largest over the overlaps)")
    return "\n".join(out)


def ablation(s: dict) -> str:
    rows = [[name, str(r.get("patches_per_run", s["batch"])), _f(r["seconds_per_patch"], 3), _f(r["gflops"], 0),
             _f(r["speedup_vs_fp32"], 2)] for name, r in s["rows"].items()]
    text = (f"Forward pass, patches of {'x'.join(map(str, s['patch_size']))}, "
            f"{s['gflop_per_patch']:.0f} GFLOP per patch\n\n"
            + _t(rows, ["variant", "patches per timed run", "s per patch (median)", "GFLOP/s", "speed-up vs fp32"]))
    if "onnxruntime_max_abs_logit_diff_vs_fp32" in s:
        text += f"\n\nONNX Runtime against the fp32 network: max |logit difference| {s['onnxruntime_max_abs_logit_diff_vs_fp32']:.2g}"
    return text


def cli(s: dict) -> str:
    st = s["stages_s_median"]
    rows = [[k, _f(v, 2)] for k, v in st.items()]
    rows.append(["**total wall (median)**", _f(s["wall_s_median"], 1) + " (" + " / ".join(
        _f(v, 1) for v in s["wall_s_all"]) + ")"])
    text = _t(rows, ["stage", "seconds (median)"])
    if s.get("probe_bf16_gflops_all"):
        text += ("\n\nCPU left to the run (bf16 GEMM probe just before each run, GFLOP/s): "
                 + " / ".join(str(v) for v in s["probe_bf16_gflops_all"]))
    text += (f"\n\npeak RSS {s['peak_rss_mib_median']:.0f} MiB (max {s['peak_rss_mib_max']:.0f}); "
             f"{s['patches']} patches; forward passes {s['forward_s_median']:.1f} s = "
             f"{100 * (s['forward_share_of_inference'] or 0):.1f} % of inference; "
             f"{_f(s['gflops_forward'], 0)} GFLOP/s in the forward passes ({_f(s['gflops_inference'], 0)} over "
             "the inference stage)")
    for k, v in s.items():
        if k.startswith("fraction_of_"):
            text += f"; {100 * v:.0f} % of {k[len('fraction_of_'):].replace('_', ' ')}"
    for name, v in s.get("variants", {}).items():
        how = " ".join(list(v["arguments"]) + [f"{k}={x}" for k, x in v.get("environment", {}).items()])
        text += (f"\n\n{name} (`{how}`): {_f(v['wall_s_median'], 1)} s median ("
                 + " / ".join(_f(w, 1) for w in v["wall_s_all"]) + f"), forward passes "
                 f"{_f(v['forward_s_median'], 1)} s, inference "
                 f"{_f(v['stages_s_median'].get('inference'), 2)} s, {v['patches']} patches, peak RSS "
                 f"{v['peak_rss_mib_median']:.0f} MiB")
    return text


def scaling(s: dict) -> str:
    rows = [["x".join(map(str, r["shape_xyz"])), f"{r['voxels'] / 1e6:.1f}", r["patches"], _f(r["wall_s"], 1),
             _f(r["engine_s"], 1), _f(r["inference_s"], 1), _f(r["peak_rss_mib"], 0),
             " / ".join(str(v) for v in r.get("probe_bf16_gflops_all", []))] for r in s["rows"]]
    text = _t(rows, ["input (x, y, z)", "M voxels", "patches", "wall s", "engine s (no start-up)",
                     "inference s", "peak RSS MiB", "bf16 GEMM probe GFLOP/s"])
    text += ("\n\nfitted exponents (cost ∝ voxels^k): wall {}, engine {}, inference {}, rest of the engine {}, "
             "peak RSS {}").format(*(_f(s[k], 2) for k in ("exponent_wall", "exponent_engine",
                                                             "exponent_inference", "exponent_non_inference",
                                                             "exponent_peak_rss")))
    return text


def loader(s: dict) -> str:
    if "rows" not in s:
        return s.get("status", "not measured")
    parts = []
    for title, sec in (("seed recipe", s), ("without spatial augmentation", s.get("without_spatial_augmentation"))):
        if not sec or "rows" not in sec:
            continue
        rows = [[n, _f(r["seconds_median"], 1), " / ".join(_f(v, 1) for v in r["seconds_all"]),
                 r["patches_per_epoch"], _f(r["patches_per_s"], 2), _f(r["peak_rss_added_mib"], 0)]
                for n, r in sec["rows"].items()]
        parts.append(f"{title}: {sec['cases']} training cases ({sec['preset']} phantoms), "
                     f"{sec['queue_workers']} queue workers, cache build {sec['cache_build_s']:.1f} s "
                     f"(once); **speed-up {sec['speedup']:.2f}×**\n\n"
                     + _t(rows, ["loader", "epoch s (median)", "all reps", "patches", "patches/s",
                                 "peak RSS added MiB (main process; queue workers not counted)"]))
    return "\n\n".join(parts)


def accuracy(s: dict) -> str:
    rows = []
    for case, row in s["cases"].items():
        if isinstance(row, str):
            rows.append([case, row] + [""] * (len(s["configs"]) + 1))
            continue
        cells = []
        for name in s["configs"]:
            d = row[name]["vs_reference"]
            cells.append(f"{_f(d.get('liver'), 4)} / {_f(d.get('tumor'), 4) if 'tumor' in d else 'n/a'}")
        agree = row["default_vs_bf16_autocast"]
        rows.append([case] + cells + [f"{_f(agree.get('liver'), 4)} / {_f(agree.get('tumor'), 4)}"])
    text = _t(rows, ["case"] + [f"{n} (liver / tumor Dice)" for n in s["configs"]]
              + ["default vs bf16_autocast agreement"])
    text += "\n\nlargest Dice move against fp32_nocrop: " + ", ".join(
        f"{k} {v:.4f}" for k, v in s["max_dice_move_vs_fp32_nocrop"].items()) + f" (tolerance {s['tolerance']})"
    return text


def targets(t: dict) -> str:
    def value(v):  # four decimals below 1, so that e.g. a Dice move of 0.0023 does not read as 0.002
        return _f(v, 4 if abs(v) < 1 else 3) if isinstance(v, (int, float)) else v

    rows = [[name, value(v["value"]), v["target"],
             {True: "met", False: "**missed**", None: "n/a"}[v["met"]]] for name, v in t.items()]
    return _t(rows, ["target", "measured", "goal", ""])


def gpu(s: dict) -> str:
    if s.get("status") != "measured":
        return s.get("status", "not measured")
    d = s["device"]
    parts = [f"{d['name']} ({d['memory_gib']:.0f} GiB, {d['multiprocessors']} SMs, compute {d['capability']}), "
             f"torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}, {d['host_cpus']} host CPUs"]
    c = s.get("cli", {})
    if "stages_s_median" in c:
        parts.append("**Whole command line** (`--device cuda`, fresh process per run; the first run pays "
                     f"CUDA start-up and cuDNN's kernel choice): first run {c['wall_s_first']:.2f} s, "
                     f"median of the later runs {_f(c['wall_s_after_first_median'], 2)} s\n\n" + cli(c)
                     + f"\n\nGPU peak memory: {c['gpu_peak_allocated_mib_max']:.0f} MiB allocated, "
                     f"{c['gpu_peak_reserved_mib_max']:.0f} MiB reserved by PyTorch")
    elif c:
        parts.append(f"Whole command line: {c.get('status')}")
    i = s.get("inference", {})
    if "by_overlap" in i:
        for overlap, row in i["by_overlap"].items():
            rows = []
            for name in ("ours", "ours_constant", "ours_body_grid", "monai_gaussian", "monai_constant",
                         "monai_gaussian_fp16"):
                if name not in row:
                    continue
                r = row[name]
                dice = r.get("dice_vs_monai_constant_fp32", {})
                rows.append([name, _f(r["seconds_median"], 3), " / ".join(_f(v, 3) for v in r["seconds_all"]),
                             _f(r["gpu_peak_mib"], 0),
                             _f(dice.get("labels"), 4) if name != "monai_constant" else "(reference)"])
            parts.append(f"**Sliding window on the GPU**, overlap {float(overlap):.4f}, "
                         f"{'x'.join(map(str, i['input_shape_xyz']))} voxels, batch {i['batch_size']}: ratio vs "
                         f"MONAI fp32 {row['ratio_vs_monai']:.3f}, vs MONAI fp16 {row['ratio_vs_monai_fp16']:.3f}, "
                         f"GPU peak vs MONAI {row['gpu_peak_ratio_vs_monai']:.2f}\n\n"
                         + _t(rows, ["competitor", "median s", "all reps s", "GPU peak MiB",
                                     "label Dice vs MONAI const fp32"]))
    elif i:
        parts.append(f"Sliding window: {i.get('status')}")
    t = s.get("training", {})
    if "synthetic" in t:
        rows = [[r["precision"], _f(r["steps_per_s"], 2), _f(r["patches_per_s"], 1), _f(r["gpu_peak_mib"], 0)]
                for r in t["synthetic"]]
        f = t["fit"]
        parts.append(f"**Training step** ({t['recipe']}, batch {t['synthetic'][0]['batch_size']} of "
                     f"{'x'.join(map(str, t['synthetic'][0]['patch_size']))}, synthetic batches)\n\n"
                     + _t(rows, ["precision", "steps/s", "patches/s", "GPU peak MiB"])
                     + f"\n\nLightning `Trainer.fit` with the cached data module ({f['cases']} phantom cases, "
                     f"{f['num_workers']} queue workers, {f['precision']}): {f['steps_per_s']:.2f} steps/s, "
                     f"{f['patches_per_s']:.1f} patches/s over {f['steps_timed']} steps")
    elif t:
        parts.append(f"Training: {t.get('status')}")
    return "\n\n".join(parts)
