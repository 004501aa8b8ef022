"""LLaVA"""
