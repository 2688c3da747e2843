"""The model tier: the core (volfs.core) checked against plain models, without a mount."""
