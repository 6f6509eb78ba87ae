"""The control side's web assets: the operator page's files (``static/``) and where to find them."""
