"""What a researcher runs: simulate, the new-hospital benchmark, their presets, comparisons and reports."""
