"""Images in, batches out: the dataset, sampler, transforms and loaders (pipeline.py), generated data
(synthetic.py), preparing ImageFolders from each source (prepare.py, sources.py, images.py), and `bench data`."""
__all__: list[str] = []
