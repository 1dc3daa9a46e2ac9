"""What measures performance: `fedmeta perf` (engine overhead, scaling, wire bytes, meta-step cost)."""
