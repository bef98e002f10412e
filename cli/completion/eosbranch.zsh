#compdef eosbranch

_eosbranch_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _EOSBRANCH_COMPLETE=complete_zsh eosbranch)
}

compdef _eosbranch_completion eosbranch
