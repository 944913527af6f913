"""The ProMISe model: the two trainable parts (APM, IPS), the decoder hook, the forward, adapter files."""
