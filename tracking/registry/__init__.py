"""The Model Registry: registered versions (versions), their files and hashes (artifact), weights-only loading
(loader), gated promotion by alias (promotion), and the submission (submission)."""
