"""system_playbooks"""
