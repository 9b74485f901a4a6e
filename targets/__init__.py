"""Runtime targets: one module per runtime behind one protocol (targets/base.py).

`targets.registry` names every target and is the one factory (`make_target`); a target module
is imported only when its target is asked for, so `import targets` loads no runtime.
"""
