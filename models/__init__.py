"""The kernorm model zoo: architectures whose normalization is a constructor argument."""
