"""Lowerings: apply a :class:`graphprune.passes.plan.CompactPlan` to a frontend's
artefact (:mod:`.torch`: an exported program's fx graph; :mod:`.onnx`: a ModelProto).
They decide nothing: every change comes from the plan."""
