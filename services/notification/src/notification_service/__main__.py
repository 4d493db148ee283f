from notification_service.app import DEFINITION
from v2v_servicekit import run

run(DEFINITION)
