"""The log layout: what the trainer writes and the report reads, defined once.

Both stages import this package; it imports nothing heavier than numpy and the standard
library, and neither stage. `layout` names the files, folders, splits, tags, statuses,
templates and text rules; `spec` is the frozen run spec and the noise settings; `files`
writes atomically and reads JSON defensively; `noise` is the gradient-noise estimator
and its one measurement schedule (values out, nothing written); `stderr` keeps
TensorFlow's start-up lines off both command lines' terminals.
"""
