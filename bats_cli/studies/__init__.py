"""Layer 6: studies of many runs (`bats ablate`) and reports (`bats report`): jobs, statistics, summaries, plots."""
