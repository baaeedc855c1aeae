"""Export: a run's checkpoint as a versioned SavedModel, its input contract, model card and provenance."""
