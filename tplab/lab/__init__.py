"""What the notebooks run: rank programs that show one idea each, and the widget panels.

* ``layer_programs``: column/row splits, the Megatron MLP, every collective (notebooks 01–02);
* ``block_programs``: one decoder block against Hugging Face's, the collective timeline (03, 05);
* ``tp_experiment``: :class:`TPExperiment`, the real generation loop at a chosen tp (05);
* ``explorer``: :class:`TPExplorer`, the cost model's deployment explorer (06).

Import the module you need: the widget panels import ipywidgets.
"""
