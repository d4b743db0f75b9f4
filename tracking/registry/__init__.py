"""The Model Registry: registered versions, gated promotion by alias, and the submission."""
