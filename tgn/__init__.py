"""The temporal graph model: memory, time encoding, neighbour buffer, temporal attention,
DynLLM fusion, training, evaluation and checkpoints. Pure torch; knows nothing of Kafka or Beam."""
