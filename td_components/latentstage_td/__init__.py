"""TouchDesigner side of latentstage: the extension (``ext``) and its name/value mapping (``mapping``).

Standard library only: TouchDesigner's Python has no latentstage package. ``build_component.py``
(one folder up) inlines these files into the component as Text DATs.
"""
