#!/usr/bin/env bash
# Extra test speech for scripts/vad_eval.py and the tests: other voices and languages than the
# packaged clips. Needs espeak-ng and sox (apt-get install espeak-ng sox); the WAVs are committed,
# so nothing else needs them. Each clip: 8 kHz mono 16-bit, peak-normalised to -1 dBFS.
set -euo pipefail
cd "$(dirname "$0")/voices"

say() {  # say NAME VOICE TEXT
  espeak-ng -v "$2" -s 160 -w "/tmp/$1.raw.wav" "$3"
  sox "/tmp/$1.raw.wav" -r 8000 -c 1 -b 16 -e signed-integer "$1.wav" norm -1
  rm "/tmp/$1.raw.wav"
}

say bot_greeting_en_f en-us+f3 "Hello, and thank you for calling Green Valley Clinic. My name is Dana. How can I help you today?"
say bot_answer_en_f en-us+f3 "Thanks for asking. Our clinic is open from eight in the morning until six in the evening on weekdays, and from nine until two on Saturdays. You can book an appointment online, by phone, or at the front desk, and most appointments are available within two days. Is there anything else I can help you with?"
say bot_greeting_he_f he+f2 "שלום, הגעתם למרפאת עמק ירוק. מדברת דנה, במה אפשר לעזור?"
say bot_answer_he_f he+f2 "תודה ששאלת. המרפאה פתוחה מהבוקר ועד הערב בימים ראשון עד חמישי, וביום שישי עד הצהריים. אפשר לקבוע תור באתר, בטלפון או בקבלה, ורוב התורים זמינים תוך יומיים. תודה ויום טוב."
say caller_sorry_en_f en-gb-scotland+f2 "Sorry, wait, that is not what I asked."
say caller_hold_en_m en-us+m4 "Hold on, can you say that again please?"
say caller_wait_he_m he+m3 "רגע, רגע, יש לי שאלה אחרת."
