"""Lowerings: apply a :class:`graphprune.passes.plan.CompactPlan` to a frontend's
artefact (:mod:`.torch`: an exported program's fx graph; :mod:`.onnx`: a ModelProto;
:mod:`.module`: a copy of the user's own ``nn.Module``, with :mod:`.widths` finding the
width attributes its forward reads).  They decide nothing: every change comes from the plan."""
