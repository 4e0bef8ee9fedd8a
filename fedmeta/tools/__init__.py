"""Tools around the research code that no pipeline stage runs: `fedmeta bench`."""
