"""The what-if edit syntax as text (light: importing it loads nothing, so the command line can
show it in its help without loading NumPy)."""

# The what-if edits of one run's curriculum, as the command line and simfluence.whatif write them.
EDIT_HELP = (
    "remove:ID[,ID...] | repeat:IDxK | move:ID@STEP | swap:STEP,STEP | reorder:STEP,STEP,... | "
    "replace:STEP=ID[,ID...] | insert:ID@STEP   (steps count from 1)"
)
