package de.medizininformatik_initiative.omi.dsf;

import java.util.ArrayList;
import java.util.List;

import org.camunda.bpm.engine.delegate.DelegateTask;
import org.hl7.fhir.r4.model.QuestionnaireResponse;
import org.hl7.fhir.r4.model.QuestionnaireResponse.QuestionnaireResponseItemAnswerComponent;
import org.hl7.fhir.r4.model.QuestionnaireResponse.QuestionnaireResponseItemComponent;

import dev.dsf.bpe.v1.ProcessPluginApi;
import dev.dsf.bpe.v1.activity.DefaultUserTaskListener;
import dev.dsf.bpe.v1.constants.CodeSystems.BpmnUserTask;
import dev.dsf.bpe.v1.variables.Variables;

/**
 * Opens an external work item: the DSF creates an in-progress QuestionnaireResponse for the user
 * task; this fills every item that names a process variable with its value (the step's inputs) and
 * clears the DSF's placeholder answers of the others (the step's outputs, for the worker to answer).
 * <p>
 * It must extend DefaultUserTaskListener: the BPE adds one of its own to every user task that has
 * none. That listener creates the response inside the engine's transaction, so a worker may see it
 * before the user task is committed; workers therefore wait a moment before they answer (see
 * omi_dsf/worker/runtime.py, "settle").
 */
public class WorkItemListener extends DefaultUserTaskListener
{
	private final ProcessPluginApi api;

	public WorkItemListener(ProcessPluginApi api)
	{
		super(api);
		this.api = api;
	}

	static boolean isDsfItem(String linkId)
	{
		return BpmnUserTask.Codes.BUSINESS_KEY.equals(linkId) || BpmnUserTask.Codes.USER_TASK_ID.equals(linkId);
	}

	@Override
	protected void afterQuestionnaireResponseCreate(DelegateTask userTask, QuestionnaireResponse created)
	{
		// for WorkItemWithdrawn, should the task end without an answer
		userTask.setVariableLocal(WorkItemWithdrawn.RESPONSE_ID, created.getIdElement().getIdPart());
	}

	@Override
	protected void beforeQuestionnaireResponseCreate(DelegateTask userTask, QuestionnaireResponse response)
	{
		Variables variables = api.getVariables(userTask.getExecution());
		for (QuestionnaireResponseItemComponent item : response.getItem())
		{
			if (isDsfItem(item.getLinkId()))
				continue;
			Object value = variables.getVariable(item.getLinkId());
			// the DSF's placeholder answer lists are immutable: replace them
			List<QuestionnaireResponseItemAnswerComponent> answers = new ArrayList<>();
			if (value != null)
				answers.add(new QuestionnaireResponseItemAnswerComponent().setValue(Values.toFhir(value)));
			item.setAnswer(answers);
		}
	}
}
