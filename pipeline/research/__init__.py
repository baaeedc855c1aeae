"""Research: the paper's experiment, its run records, and the reports and comparisons built from them."""
