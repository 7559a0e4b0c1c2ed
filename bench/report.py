"""Turns a pytest-benchmark JSON file into a markdown table of ratios per group.

``python -m bench.report out.json [--baseline fastis] >> bench/results/<name>.md``: one row
per benchmark group, the median time of each provider and each provider's time divided by
the baseline's (so > 1 means the baseline is faster).
"""

import argparse
import json
import platform
from collections import defaultdict


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--baseline", default="fastis")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = bench["params"].get("provider", bench["name"])
        groups[bench["group"]][provider] = bench["stats"]["median"]
    providers = sorted({p for g in groups.values() for p in g}, key=lambda p: p != args.baseline)
    machine = data.get("machine_info", {})
    print(
        f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{machine.get('cpu', {}).get('count', '?')} cores; "
        f"{data.get('datetime', '')[:19]}; medians.\n"
    )
    head = " | ".join(f"{p} (ms)" for p in providers)
    ratios = " | ".join(f"{p} / {args.baseline}" for p in providers if p != args.baseline)
    print(f"| group | {head} | {ratios} |")
    print("|" + "---|" * (1 + 2 * len(providers) - 1))
    for name, times in groups.items():
        base = times.get(args.baseline)
        cells = " | ".join(f"{times[p] * 1e3:.3f}" if p in times else "" for p in providers)
        rel = " | ".join(
            f"{times[p] / base:.2f}" if p in times and base else ""
            for p in providers
            if p != args.baseline
        )
        print(f"| {name} | {cells} | {rel} |")


if __name__ == "__main__":
    main()
