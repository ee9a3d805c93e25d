"""The HTML report: one self-contained page built from what the commands already wrote in run folders.

`collect` finds and reads a run folder's files, `tables` turns them into the page's tables with the terminal's
rounding, `build` renders the page from the Jinja2 templates in `templates/` (a base and a stylesheet that other
pages can extend). Nothing of these loads or runs a model. `sheet` is the exception: the examiner pages of
`smadlrp predict --sheet` (one per image) run the model it is given for their heatmaps and perturbed scores.
"""
