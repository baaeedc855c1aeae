"""Release: validating a candidate, the operations gate, its blessing, and pushing and labelling versions."""
