"""``idpin bench``: the race-condition suite and the performance benchmarks."""
