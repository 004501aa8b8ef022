"""the engine"""
