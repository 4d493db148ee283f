from v2v_servicekit import run

from notification_service.app import DEFINITION

run(DEFINITION)
