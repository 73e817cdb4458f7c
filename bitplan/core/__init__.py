"""The torch side of bitplan: model loading, layer discovery, quantizers,
sensitivity methods, plan validation. Imported only by code that runs models
(the CLI's commands and, later, the workers), never by the API process.
"""
