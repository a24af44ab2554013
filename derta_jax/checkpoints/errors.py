"""The error every checkpoint reader raises."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as this model; the message names file and tensor."""
