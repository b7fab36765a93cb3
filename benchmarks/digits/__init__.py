"""The MoE Jetpack recipe in miniature on scikit-learn's digits: the data (``data``), a small training loop
(``train_loop``), donors, recycling and the training arms (``experiment``), and the end-to-end demo (``demo``)."""
