"""Speech recognition modules (the article's speech branch): Whisper and CTC Conformer recognizers behind one
interface (`autoglm.speech.recognizer.SpeechRecognizer`)."""
