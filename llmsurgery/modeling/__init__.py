"""Runtime modules that transformed models need; their files are also written next to the weights."""
