"""The `fedmeta perf` report: one Markdown section per part, and each figure against its target."""

from __future__ import annotations

from typing import Any

from fedmeta.simulations.perf import inference, meta_step

TARGETS = {"ray_vs_bare": 1.25, "memory_largest_vs_smallest": 1.3, "bytes_vs_fp32": 1.05, "maml_vs_fomaml": 3.0,
           "fomaml_vs_plain": 1.3}


def format_report(results: dict[str, Any]) -> str:
    lines = [f"# fedmeta perf ({results['machine']})", ""]
    checks = []
    if "sim" in results:
        s = results["sim"]
        lines += [
            f"## Simulation overhead: {s['sites']} sites, {s['rounds']} rounds",
            "", "| engine | wall s | × bare loop |", "|---|---:|---:|",
            f"| bare loop (fedmeta.common.meta) | {s['bare_seconds']:.1f} | 1.00 |",
            f"| in-process engine | {s['inprocess_seconds']:.1f} | {s['inprocess_vs_bare']:.2f} |",
            f"| Flower Simulation Engine (Ray) | {s['ray_seconds']:.1f} | {s['ray_vs_bare']:.2f} |",
            "",
            f"Ray: {s['ray_seconds_in_rounds']:.1f} s in rounds ({s['ray_rounds_vs_bare']:.2f} × bare), "
            f"{s['ray_seconds_outside_rounds']:.1f} s start-up and shutdown.",
            "",
        ]
        if s.get("rounds_for_target"):
            lines += [f"Start-up and shutdown are a fixed cost per run: with these per-round times, Ray / bare loop "
                      f"is within {TARGETS['ray_vs_bare']} from about {s['rounds_for_target']} rounds on.", ""]
        lines += _startup_lines(s)
        checks.append(("Ray / bare loop", s["ray_vs_bare"], TARGETS["ray_vs_bare"]))
    if "scaling" in results:
        c = results["scaling"]
        lines += [f"## Scaling on the Simulation Engine ({c['sites_per_round']} sites sampled per round, "
                  f"{c['rounds']} rounds)", "",
                  "| sites | sampled / round | s / round | first round s | start-up s | peak memory of the process "
                  "tree (MB, PSS) | federation generated in s | sites rendered | federation on disk (MB) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        rows = [(count, row) for count, row in c["by_sites"].items()]
        if "by_sites_sampled" in c:
            rows += [(c["largest"], row) for sampled, row in c["by_sites_sampled"].items()
                     if int(sampled) != c["sites_per_round"]]
        for count, row in rows:
            lines.append(f"| {count} | {row['sites_per_round']} | {row['seconds_per_round']:.2f} | "
                         f"{row['first_round_seconds']:.2f} | {row['startup_seconds']:.1f} | "
                         f"{row['peak_tree_bytes'] / 2**20:.0f} | {row['federation_generation_seconds']:.1f} | "
                         f"{row['sites_rendered']} | {row['federation_disk_bytes'] / 2**20:.0f} |")
        if "inprocess_by_sites" in c:
            lines += ["", "In-process engine (the same apps, no Flower engine), cold too:", "",
                      "| sites | s / round | first round s | whole run s | peak memory (MB, PSS) |",
                      "|---:|---:|---:|---:|---:|"]
            lines += [f"| {count} | {row['seconds_per_round']:.2f} | {row['first_round_seconds']:.2f} | "
                      f"{row['seconds']:.1f} | {row['peak_tree_bytes'] / 2**20:.0f} |"
                      for count, row in c["inprocess_by_sites"].items()]
        engine_cpu = [f"{count}: {row['engine_cpu_seconds']:.1f} s" for count, row in c["by_sites"].items()
                      if "engine_cpu_seconds" in row]
        if engine_cpu:
            lines += ["", "CPU of the flwr-simulation process (ServerApp, Ray driver; Flower polls every simulated "
                          "node's inbox every 0.1 s): " + ", ".join(engine_cpu) + "."]
        lines += ["", f"{c['largest']} / {c['smallest']} sites: memory {c['memory_largest_vs_smallest']:.2f}×, "
                      f"seconds per round {c['round_time_largest_vs_smallest']:.2f}×, first (cold) round "
                      f"{c['first_round_largest_vs_smallest']:.2f}×"
                      + (f"; {c['largest']} sites with {list(c['by_sites_sampled'])[-1]} sampled per round / "
                         f"{c['sites_per_round']}: seconds per round {c['round_time_more_sampled_vs_sampled']:.2f}×"
                         if "by_sites_sampled" in c else "")
                      + (f"; in-process engine, first round {c['inprocess_first_round_largest_vs_smallest']:.2f}×"
                         if "inprocess_first_round_largest_vs_smallest" in c else "") + ".", ""]
        checks.append((f"memory {c['largest']} / {c['smallest']} sites", c["memory_largest_vs_smallest"],
                       TARGETS["memory_largest_vs_smallest"]))
    if "comm" in results:
        lines += ["## Communication per site and round (default model)", "",
                  "| algorithm | model fp32 bytes | reply bytes | × model | × arrays sent |", "|---|---:|---:|---:|---:|"]
        for algorithm, row in results["comm"].items():
            lines.append(f"| {algorithm} | {row['model_fp32_bytes']} | {row['reply_bytes']} | "
                         f"{row['reply_vs_model']:.3f} | {row['reply_vs_payload']:.3f} |")
        lines.append("")
        checks.append(("fomaml reply / fp32 model", results["comm"]["fomaml"]["reply_vs_model"], TARGETS["bytes_vs_fp32"]))
    if "meta" in results:
        lines.append(meta_step.format_table(results["meta"]["setting"], results["meta"]["table"]))
        lines.append("")
        t = results["meta"]["table"]["targets"]
        checks.append(("MAML / FOMAML time", t["maml_time_vs_fomaml"], TARGETS["maml_vs_fomaml"]))
        checks.append(("FOMAML / plain forward-backward", t["fomaml_time_vs_plain"], TARGETS["fomaml_vs_plain"]))
    if "episodes" in results:
        e = results["episodes"]
        lines += [meta_step.format_episodes(f"A site's episodes: loop or batched (torch.func.vmap), {e['setting']}, "
                                            f"{e.get('device', 'cpu')}", e["rows"]), ""]
        if "runs" in e:
            r = e["runs"]
            lines += [f"Whole bare-loop runs, FOMAML, {r['sites']} sites, {r['rounds']} rounds (fastest of the repeats):",
                      "", "| episodes per site | loop s | vmap s | vmap / loop |", "|---:|---:|---:|---:|"]
            lines += [f"| {count} | {row['loop_seconds']:.1f} | {row['vmap_seconds']:.1f} | {row['vmap_vs_loop']:.2f} |"
                      for count, row in r["by_episodes"].items()]
            lines.append("")
    if "secagg" in results:
        g = results["secagg"]
        lines += [f"## Secure aggregation (SecAgg+) against plain aggregation: {g['sites']} sites, {g['rounds']} rounds, "
                  "default model", "", "| aggregation | bytes down / site / round | bytes up / site / round | "
                  "s / round |", "|---|---:|---:|---:|"]
        for label, row in (("plain", g["plain"]), ("secagg+", g["secagg"])):
            lines.append(f"| {label} | {row['bytes_down_per_site_round']:.0f} | {row['bytes_up_per_site_round']:.0f} | "
                         f"{row['seconds_per_round']:.2f} |")
        lines += ["", f"SecAgg+ / plain: bytes {g['bytes_vs_plain']:.3f}×, seconds per round "
                      f"{g['seconds_vs_plain']:.2f}×.", ""]
    if "inference" in results:
        lines += inference.format_inference(results["inference"])
        target = results["inference"].get("target")
        if target is not None:
            checks.append((f"CT {inference.TARGET_SLICES} slices, {inference.TARGET_THREADS} threads: wall s",
                           target["seconds"], inference.TARGET_SECONDS))
            checks.append((f"CT {inference.TARGET_SLICES} slices, {inference.TARGET_THREADS} threads: peak GB",
                           target["peak_bytes"] / 1e9, inference.TARGET_BYTES / 1e9))
    lines += ["## Targets", "", "| figure | measured | target | met |", "|---|---:|---:|---|"]
    for name, value, target in checks:
        lines.append(f"| {name} | {value:.2f} | ≤ {target} | {'yes' if value <= target else 'no'} |")
    return "\n".join(lines)


def _startup_lines(s: dict[str, Any]) -> list[str]:
    startup = s.get("ray_startup")
    if not startup:
        return []
    lines = ["### Where the Simulation Engine's start-up goes", "",
             "| phase (each ends when the next process appears) | s |", "|---|---:|"]
    lines += [f"| {phase['phase']} | {phase['seconds']:.1f} |" for phase in startup["phases"]]
    if startup["shutdown_seconds"] is not None:
        lines.append(f"| after the last round: ServerApp's end, Ray shutdown, `flwr list`, processes stopped | "
                     f"{startup['shutdown_seconds']:.1f} |")
    lines += ["", "| process role | processes | CPU s |", "|---|---:|---:|"]
    lines += [f"| {role} | {startup['processes_by_role'][role]} | {cpu:.1f} |"
              for role, cpu in startup["cpu_seconds_by_role"].items()]
    lines.append("")
    for label, profile in s.get("imports", {}).items():
        parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in profile["by_package"].items())
        lines.append(f"Importing the {label} (`{profile['module']}`) in a fresh interpreter: "
                     f"{profile['process_seconds']:.1f} s in all, imports {profile['import_seconds']:.2f} s: {parts}.")
    lines.append("")
    return lines
