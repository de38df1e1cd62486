"""Surgery passes: each a frozen pydantic config plus functions over a loaded model."""
