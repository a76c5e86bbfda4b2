"""Reports from the tables: summaries, statistics, plots, studies."""
